"""``paw bench``: paw's interpreter against mlx-lm and transformers on the same weights.

``harness`` plans the run and prints the table; ``prepare`` builds each engine's copy of
the weights (cached); ``worker`` measures one engine in its own process, so imports and
memory of one engine never touch another's numbers.
"""

import interp  # noqa: F401  (first: puts a fast BLAS under MLX before MLX loads)
