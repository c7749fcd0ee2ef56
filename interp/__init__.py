"""The MLX interpreter of paw's graph programs.

Importing this package puts a fast BLAS under MLX's CPU backend on Linux (see
``interp.blas``) and keeps float32 products float32 on GPUs that MLX would run in TF32
(``interp.device.keep_float32_exact``). It must happen before ``mlx.core`` is first
imported, so every paw package imports ``interp`` before anything that imports MLX.
"""

from interp.blas import install as _install_blas
from interp.device import keep_float32_exact as _keep_float32_exact
from interp.device import require_mlx as _require_mlx

_keep_float32_exact()
_install_blas()
_require_mlx()
