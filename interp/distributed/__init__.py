"""Running one program over several processes (several Macs) with ``mx.distributed``.

- ``world.py``: whether this process is a rank of a launched run, and connecting to the others.
- ``stages.py``: the cut of a program into contiguous layer ranges, from its graph.
- ``driver.py``: rank 0's model and the other ranks' loop, shared by both modes; the KV cache.
- ``pipeline.py``: pipeline parallelism (send/recv of activations around the ring).
- ``sharding.py`` / ``tensor.py``: tensor parallelism (split heads and MLP widths, all_sum).
- ``loader.py``: loading one rank's share and checking in with the others.
- ``wire.py``: the messages ranks exchange; ``watchdog.py``: deadlines no hang can dodge.

``paw_mlx.load`` and ``paw run`` use ``load_parallel`` when ``connect()`` finds a launched
run of more than one rank.
"""

from interp.distributed.loader import PARALLEL_MODES, RankReport, load_parallel
from interp.distributed.world import World, connect, launched

__all__ = ["PARALLEL_MODES", "RankReport", "World", "connect", "launched", "load_parallel"]
