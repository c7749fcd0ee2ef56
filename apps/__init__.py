"""paw's command line and chat app."""

import interp  # noqa: F401  (first: puts a fast BLAS under MLX before MLX loads)
