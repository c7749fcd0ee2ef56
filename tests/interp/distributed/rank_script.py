"""What every rank runs under mlx.launch in tests/interp/distributed/test_launch.py.

    rank_script.py OUT.json MODE:PROGRAM...

For each job: load PROGRAM split over the ranks (MODE pipeline or tensor); rank 0 then
runs ``exercise`` and writes what it saw, with every rank's check-in report, to OUT.json.
The other ranks serve each program until rank 0 closes it.
"""

from __future__ import annotations

import json
import sys

import interp  # noqa: F401  (first: the fast BLAS must load before MLX)

# isort: split
import mlx.core as mx

from interp import distributed
from paw_mlx.runtime import LoadedProgram, stream_tokens

PROMPT = [5, 17, 33, 90, 12, 7, 101]
SHORT = [9, 4, 250, 31]
LONG = [(7 * i + 3) % 380 + 3 for i in range(150)]  # its ids and positions outgrow the header: a message of their own


def _decode(model, token: int, cache, count: int) -> list[int]:
    out = []
    for _ in range(count):
        logits = model(mx.array([[token]], dtype=mx.int32), cache=cache)
        token = int(mx.argmax(logits[0, -1]).item())
        out.append(token)
    return out


def exercise(prog: LoadedProgram) -> dict:
    """Greedy generation, a copied and a trimmed cache, a left-padded batch with a key mask, a long prompt."""
    greedy = list(stream_tokens(prog, PROMPT, max_tokens=8))
    model = prog.model
    cache = prog.make_cache()
    model(mx.array([PROMPT[:-1]], dtype=mx.int32), cache=cache)
    # a distributed cache copies whole (every rank copies its part); a local one layer by layer
    copy = cache.copy() if hasattr(cache, "model") else [layer.copy() for layer in cache]
    first = _decode(model, PROMPT[-1], cache, 4)
    second = _decode(model, PROMPT[-1], copy, 4)
    del copy  # the other ranks drop their part with the next step
    for layer in cache:
        layer.trim(layer.offset - (len(PROMPT) - 1))
    third = _decode(model, PROMPT[-1], cache, 4)
    # both rows start with PROMPT[0] (as a program's shared prefix would), so pads attend to something
    pad = len(PROMPT) - 1 - len(SHORT)
    tokens = mx.array([PROMPT[:1] + [0] * pad + SHORT, PROMPT], dtype=mx.int32)
    positions = mx.array([[0] + [1] * pad + list(range(1, len(SHORT) + 1)), list(range(len(PROMPT)))], dtype=mx.int32)
    mask = mx.array([[True] + [False] * pad + [True] * len(SHORT), [True] * len(PROMPT)])
    logits = model(tokens, cache=prog.make_cache(), positions=positions, key_mask=mask)[:, -1, :]
    long = model(mx.array([LONG], dtype=mx.int32), cache=prog.make_cache())[:, -1, :]
    return {"greedy": greedy, "copies": [first, second, third], "batch": logits.tolist(), "long": long.tolist()}


def refused_step(model) -> str:
    """A step one rank cannot run (rank 0's cache claims positions the others never saw): the
    error that rank 0 raises; then a fresh step, which must still work."""
    from interp.errors import DistributedError

    cache = model.make_cache()
    model(mx.array([PROMPT], dtype=mx.int32), cache=cache)
    for layer in cache.local:
        keys, values = layer.state
        layer.state = (mx.concatenate([keys, keys], axis=2), mx.concatenate([values, values], axis=2))
    try:
        model(mx.array([[PROMPT[0]]], dtype=mx.int32), cache=cache)
    except DistributedError as exc:
        message = str(exc)
    else:
        message = "no error"
    mx.eval(model(mx.array([PROMPT], dtype=mx.int32), cache=model.make_cache()))
    return message


def main(out: str, jobs: list[str]) -> None:
    world = distributed.connect()
    results = []
    for job in jobs:
        mode, _, path = job.partition(":")
        program, model = distributed.load_parallel(path, world, mode, exit_when_done=False)
        if model is None:
            continue  # not rank 0: served this program until rank 0 closed it
        result = exercise(LoadedProgram(program, model, None))
        if not model.tensor_parallel:  # under tensor parallelism such a step breaks the lockstep: fatal
            result["refused"] = refused_step(model)
        result["ranks"] = [report.weight_bytes for report in model.ranks]
        results.append(result)
        model.close()
    if world.rank == 0:
        with open(out, "w", encoding="utf-8") as fh:
            json.dump(results, fh)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
