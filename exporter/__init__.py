"""The torch.export-based exporter: Hugging Face causal LM to graph program."""

import interp  # noqa: F401  (first: puts a fast BLAS under MLX before MLX loads)
