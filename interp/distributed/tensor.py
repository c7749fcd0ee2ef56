"""Tensor parallelism at run time: every rank runs its share of every layer, in lockstep.

The plan (``interp/distributed/sharding.py``) gives each rank a program with local
widths and ``all_sum`` nodes, and says how to cut each const; a rank keeps only its cuts.
Rank 0 broadcasts each command (an all_sum of the header to which the other ranks add
zeros), then every rank runs the same step, meeting at each all_sum. Rank 0 alone runs
the output head and returns the logits; the other ranks stop at the last all_sum, so an
untied output head is loaded on rank 0 only. The embedding, the norms and whatever the
plan keeps whole are on every rank.

A rank that cannot run a step cannot tell the others without breaking the lockstep, so
it ends itself with one line; the others then lose the connection and say so.
"""

from __future__ import annotations

from dataclasses import replace

import mlx.core as mx

from interp.distributed import wire
from interp.distributed.driver import (
    DistributedCache,
    Driver,
    Worker,
    fail_rank,
    lost_connection,
    step_inputs,
)
from interp.distributed.loading import held_bytes, load_consts
from interp.distributed.sharding import ShardPlan, describe_plan, plan_tensor_parallel
from interp.distributed.wire import Header, Op
from interp.distributed.world import World
from interp.graph import GraphModel
from interp.program import Program
from interp.schema import references


class TensorParallelModel(Driver):
    """Rank 0's view of a tensor-parallel program: call it like ``GraphModel``."""

    tensor_parallel = True

    def __init__(self, program: Program, plan: ShardPlan, world: World, model: GraphModel):
        super().__init__(program, world, list(range(program.num_layers)))
        self.plan = plan
        self._model = model

    @property
    def consts(self) -> dict:
        return self._model.consts

    def _step(self, header: Header, inputs: dict[str, mx.array], cache: DistributedCache | None,
              offset: int | None, key_mask: mx.array | None) -> mx.array:
        wire.broadcast_header(header, self.world.group)
        logits = self._model.forward(inputs, cache.local if cache is not None else None, offset, key_mask)["logits"]
        mx.eval(logits)  # the all_sums run here, under the watchdog
        return logits

    def _command(self, header: Header) -> None:
        wire.broadcast_header(header, self.world.group)


class TensorWorker(Worker):
    """A rank other than 0: runs its share of every step rank 0 broadcasts."""

    def _receive(self) -> Header:
        return wire.broadcast_header(None, self.world.group, self.world.wait_for_message)

    def _handle(self, header: Header) -> bool:
        if header.op == Op.FORWARD:
            self._release(header)
            inputs, offset, key_mask = step_inputs(header)
            try:
                outs = self.model.forward(inputs, self._cache(header), offset, key_mask)
                mx.eval(list(outs.values()))
            except Exception as exc:  # noqa: BLE001 - the lockstep is broken: end this rank with one line
                if lost_connection(exc):
                    raise
                fail_rank(f"{self.world.me}: could not run a step: {exc}", self.world)
        elif header.op == Op.FORK:
            self._fork(header)
        return header.op == Op.SHUTDOWN


def load_tensor_parallel(program: Program, world: World, compile: bool):  # noqa: A002 - mx.compile's name
    """(build, weight bytes, shares) for ``interp/distributed/loader.py``."""
    plan = plan_tensor_parallel(program, world.size)
    local = plan.rank_program(world.rank)
    if world.rank != 0:
        local = without_output_head(local)
    names = {name for node in local.nodes for name in references(node) if name in local.spec["consts"]}
    consts = load_consts(program, names, cut=lambda name, array: plan.cut_const(name, array, world.rank))
    model = GraphModel(local, consts, compile_decode=compile)
    summary = describe_plan(plan)

    def build():
        if world.rank == 0:
            return TensorParallelModel(program, plan, world, model)
        return TensorWorker(world, model)

    shares = [f"1/{world.size} of {summary}" + (" + output head" if rank == 0 else "") for rank in range(world.size)]
    return build, held_bytes(consts.values()), shares


def without_output_head(program: Program) -> Program:
    """``program`` cut down to what feeds its all_sums and attention caches (the other ranks' part).

    Those nodes are the ones every rank must run together; the logits after the last
    all_sum are rank 0's alone.
    """
    keep_outputs = [out for node in program.nodes if node.op in ("all_sum", "attention") for out in node.outputs]
    needed = set(keep_outputs)
    kept = []
    for node in reversed(program.nodes):
        if needed & set(node.outputs):
            kept.append(node)
            needed |= references(node)
    kept.reverse()
    spec = dict(program.spec, outputs=[{"name": name} for name in keep_outputs])
    return replace(program, spec=spec, nodes=kept)
