"""Pipeline parallelism: each rank runs a contiguous share of the layers; activations move by send/recv.

One call of rank 0's model runs its first layers and sends the step (a header, then the
tensors that cross the cut) to rank 1, which runs its layers and passes on, around the
ring to the last rank, which sends its hidden state back to rank 0. Rank 0 runs the
output head (``interp/distributed/stages.py`` says why there) and returns the logits, so
sampling, penalties and constraints stay on rank 0. Every layer's KV cache lives on the
rank that runs the layer. Each rank only talks to its ring neighbours, which is all
MLX's ring backend allows.

Every command goes round the whole ring and comes back to rank 0, so rank 0 always
waits for one reply, and a rank that cannot run a step (out of memory, a cache out of
step) sends an ERROR header round instead, which rank 0 raises as one line. Rank 0 then
trims its layers back to the length before the step, and with the next step every other
rank trims to it too, so the cache stays usable.
"""

from __future__ import annotations

import mlx.core as mx

from interp.distributed import wire
from interp.distributed.driver import DistributedCache, Driver, Worker, lost_connection, step_inputs
from interp.distributed.stages import PipelinePlan, Stage
from interp.distributed.wire import Header, Op
from interp.distributed.world import World
from interp.errors import DistributedError
from interp.graph import GraphModel
from interp.program import Program


class PipelineModel(Driver):
    """Rank 0's view of a pipeline-parallel program: call it like ``GraphModel``."""

    tensor_parallel = False

    def __init__(self, program: Program, plan: PipelinePlan, world: World, head: GraphModel, tail: GraphModel):
        super().__init__(program, world, list(plan.stages[0].layers))
        self.plan = plan
        self.head_stage, self.tail_stage = plan.stages[0], plan.stages[-1]
        self._head, self._tail = head, tail

    @property
    def consts(self) -> dict:
        """The weights rank 0 holds (its first layers and the output head)."""
        return {**self._head.consts, **self._tail.consts}

    def _step(self, header: Header, inputs: dict[str, mx.array], cache: DistributedCache | None,
              offset: int | None, key_mask: mx.array | None) -> mx.array:
        world = self.world
        head = self._head.forward(inputs, cache.local if cache is not None else None, offset, key_mask)
        outgoing = [head[name] for name in self.head_stage.sends]
        mx.eval(outgoing)  # a failure to compute is raised here, before the ring hears of the step
        header.tensors = wire.describe(outgoing)
        wire.send_header(header, world.next, world.group)
        wire.send_tensors(outgoing, world.next, world.group)
        try:
            reply = self._reply()
        except DistributedError:
            if cache is not None:  # back to where every rank can return: the ranks trim to it next step
                for layer in cache.local:
                    layer.trim(layer.offset - header.cache_offset)
            raise
        arrived = wire.recv_tensors(reply, world.previous, world.group)
        tail_inputs = dict(inputs)
        tail_inputs.update(zip(self.tail_stage.receives, arrived, strict=True))
        tail_inputs.update({name: head[name] for name in self.tail_stage.local})
        return self._tail.forward(tail_inputs, None, offset, key_mask)["logits"]

    def _command(self, header: Header) -> None:
        wire.send_header(header, self.world.next, self.world.group)
        self._reply()

    def _reply(self) -> Header:
        reply = wire.recv_header(self.world.previous, self.world.group, self.world.wait_for_message)
        if reply.op == Op.ERROR:
            raise DistributedError(reply.text)
        return reply


class PipelineWorker(Worker):
    """A rank other than 0: runs its stage on every step and passes the result on."""

    def __init__(self, world: World, stage: Stage, model: GraphModel):
        super().__init__(world, model)
        self.stage = stage

    def _receive(self) -> Header:
        return wire.recv_header(self.world.previous, self.world.group, self.world.wait_for_message)

    def _handle(self, header: Header) -> bool:
        world = self.world
        outgoing: list[mx.array] = []
        if header.op == Op.FORWARD:
            self._release(header)
            arrived = wire.recv_tensors(header, world.previous, world.group)
            try:
                header, outgoing = self._forward(header, arrived)
            except DistributedError as exc:
                header = Header(Op.ERROR, text=str(exc))
            except Exception as exc:  # MLX raises plain RuntimeError/ValueError (memory, shapes): tell rank 0
                if lost_connection(exc):
                    raise
                header = Header(Op.ERROR, text=f"{world.me}: {type(exc).__name__}: {exc}")
        elif header.op == Op.FORK:
            self._fork(header)
        wire.send_header(header, world.next, world.group)
        wire.send_tensors(outgoing, world.next, world.group)
        return header.op == Op.SHUTDOWN

    def _forward(self, header: Header, arrived: list[mx.array]) -> tuple[Header, list[mx.array]]:
        """The message for the next rank, and the tensors that follow it."""
        inputs, offset, key_mask = step_inputs(header)
        inputs.update(zip(self.stage.receives, arrived, strict=True))
        outs = self.model.forward(inputs, self._cache(header), offset, key_mask)
        outgoing = [outs[name] for name in self.stage.sends]
        mx.eval(outgoing)  # a failure to compute is raised here, before the next rank hears of the step
        last = self.world.next == 0
        reply = Header(Op.FORWARD, header.cache, header.batch, header.length, header.offset, header.cache_offset,
                       header.mask_keys, released=header.released, tensors=wire.describe(outgoing),
                       ints=None if last else header.ints)
        return reply, outgoing
