"""The MLX interpreter of paw's graph programs.

Importing this package puts a fast BLAS under MLX's CPU backend on Linux (see
``interp.blas``). It must happen before ``mlx.core`` is first imported, so every paw
package imports ``interp`` before anything that imports MLX.
"""

from interp.blas import install as _install_blas
from interp.device import require_mlx as _require_mlx

_install_blas()
_require_mlx()
