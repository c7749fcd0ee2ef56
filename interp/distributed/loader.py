"""Load a program as one rank of a distributed run: plan the split, read this rank's weights, check in.

Every rank reads ``prog.json`` and computes the same plan, so no plan is sent. Each
loads only the consts its share uses (``interp/distributed/loading.py``). Then all ranks
check in together (one ``all_sum`` of status and memory): a rank that could not load
says why in its own line, and every other rank says which rank failed, instead of
waiting on it forever. After check-in rank 0 returns a model; the other ranks serve
rank 0 until it is done and then exit the process (``SystemExit(0)``), so code after
``paw_mlx.load`` runs on rank 0 only.
"""

from __future__ import annotations

import atexit
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np

from interp.device import resident_bytes
from interp.distributed.driver import lost_connection
from interp.distributed.loading import held_bytes, load_consts
from interp.distributed.pipeline import PipelineModel, PipelineWorker
from interp.distributed.stages import plan_pipeline, stage_program
from interp.distributed.world import World
from interp.errors import DistributedError, PawError
from interp.graph import GraphModel
from interp.ops import REGISTRY
from interp.program import Program, read_program

#: How a program is split over the ranks: ``auto`` is ``pipeline`` (every program can be
#: cut between layers; tensor parallelism needs head counts that divide and costs two
#: all_sums per layer), ``none`` loads the whole program on every rank.
PARALLEL_MODES = ("auto", "pipeline", "tensor", "none")


@dataclass(frozen=True)
class RankReport:
    """What one rank holds, as it reported at check-in."""

    rank: int
    share: str  #: e.g. 'layers 0-14 + output head'
    weight_bytes: int
    resident_bytes: int  #: the process's resident memory once loaded (weights, code, buffers)


def load_parallel(path: str | Path, world: World, mode: str, *, compile: bool = True,  # noqa: A002 - mx.compile's name
                  shares: list[float] | None = None, exit_when_done: bool = True):
    """(program, model) on rank 0; on the other ranks serve rank 0, then ``SystemExit``.

    ``mode`` is ``pipeline`` or ``tensor``; ``shares`` weighs how much of the weights each
    rank takes in a pipeline (see ``plan_pipeline``). The model has ``ranks``, the check-in
    report of every rank. With ``exit_when_done=False`` the other ranks return (program,
    None) once rank 0 has closed the model, so one process can serve several models in turn.
    """
    if world.active is not None and not world.active.closed:
        raise DistributedError(f"{world.me}: another distributed model is open; the other ranks serve one at a "
                               "time: close it first (model.close())")
    failure: BaseException | None = None
    build: Callable | None = None
    weight, described, program = 0, [""] * world.size, None
    try:
        program = read_program(path, known_ops=set(REGISTRY))
        if mode == "pipeline":
            build, weight, described = _load_pipeline(program, world, compile, shares)
        elif shares:
            raise DistributedError("pipeline shares apply to pipeline parallelism; tensor parallelism splits evenly")
        else:
            from interp.distributed.tensor import load_tensor_parallel

            build, weight, described = load_tensor_parallel(program, world, compile)
    except Exception as exc:  # noqa: BLE001 - any failure must reach the check-in, or the others wait for it
        failure = exc
    table = _check_in(world, failed=failure is not None, weight=weight)
    failed = [rank for rank in range(world.size) if table[rank, 0]]
    try:
        if failure is not None:
            raise failure
        if failed:
            who = ", ".join(str(rank) for rank in failed)
            raise DistributedError(f"{world.me}: rank {who} could not load the program (its own line says why)")
        model = build()
    except PawError as exc:
        text = str(exc) if str(exc).startswith(world.me) else f"{world.me}: {exc}"
        if world.rank == 0:
            raise type(exc)(text) from None
        _exit_rank(world, 1, text)
    if world.rank != 0:
        try:
            model.serve()
        except PawError as exc:
            _exit_rank(world, 1, str(exc))
        if not exit_when_done:
            return program, None
        _exit_rank(world, 0)
    model.ranks = [RankReport(rank, described[rank], int(table[rank, 1]), int(table[rank, 2]))
                   for rank in range(world.size)]
    world.active = model
    atexit.register(model.close)
    return program, model


def _load_pipeline(program: Program, world: World, compile: bool, shares: list[float] | None):  # noqa: A002
    plan = plan_pipeline(program, world.size, shares)
    stages = plan.for_rank(world.rank)
    consts = load_consts(program, {name for stage in stages for name in stage.consts})
    models = [GraphModel(stage_program(program, stage, final=stage is plan.stages[-1]),
                         {name: consts[name] for name in stage.consts}, compile_decode=compile)
              for stage in stages]
    if world.rank == 0:
        def build():
            return PipelineModel(program, plan, world, models[0], models[1])
    else:
        def build():
            return PipelineWorker(world, stages[0], models[0])
    return build, held_bytes(consts.values()), [plan.describe(rank) for rank in range(world.size)]


def _check_in(world: World, *, failed: bool, weight: int) -> np.ndarray:
    """Every rank's [failed, weight bytes, resident bytes], once all ranks have loaded."""
    row = np.zeros((world.size, 3), dtype=np.int64)
    row[world.rank] = [int(failed), weight, resident_bytes()]
    timeout = world.timeout
    try:
        with world.watchdog.deadline(timeout, f"{world.me}: the other ranks did not finish loading within "
                                              f"{timeout:g} s (a rank hung, or the network failed)"):
            table = mx.distributed.all_sum(mx.array(row), group=world.group)
            mx.eval(table)
    except RuntimeError as exc:
        if not lost_connection(exc):
            raise
        if world.rank == 0:
            raise DistributedError(f"{world.me}: lost a rank while loading (it died, or the network failed)") from exc
        _exit_rank(world, 1, f"{world.me}: lost a rank while loading (it died, or the network failed)")
    return np.array(table)


def _exit_rank(world: World, code: int, message: str = "") -> None:
    """End a rank other than 0: its one line (if any), then SystemExit."""
    world.watchdog.close()
    if message:
        print(f"paw: error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(code)
