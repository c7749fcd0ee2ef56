"""The whole decode step as one ``mx.compile``: fixed-capacity KV buffers and a key mask.

Why: MLX runs every primitive of a graph as its own task, and the Python that builds the
graph runs on the same cores. A SmolLM2 decode step cut into compiled segments between
its attention ops (``interp/compiled.py``) holds about 3,200 primitives (on the CPU,
``mx.fast.rope`` and ``rms_norm`` fall back to a dozen ops each) and builds 31 graphs.
Traced as one function, MLX fuses every elementwise chain of the step and the step is one
call: about 2,000 primitives, and building it takes 6-7 ms per token instead of 12.

A traced step must keep its shapes from token to token, so the cache is read at its
capacity, not its length: every layer's keys and values stay in the ``KVCache`` buffers,
which grow 256 positions at a time; the new token is written at ``offset`` with
``mx.slice_update`` (the offset is an array, so a new position does not retrace), and
attention sees a key mask of the positions written so far. The step retraces only when the
buffers grow (every 256 tokens) or the batch changes. The old buffers are dropped before
the new ones are evaluated, so MLX updates them in place rather than copying.

Only plain causal attention takes this path: sliding windows, logit soft-capping and ALiBi
need the real key count, so such programs keep the segment compilation of
``interp/compiled.py``. So do caches other than paw's own ``KVCache`` (an mlx-lm cache
passed in) and a first step with nothing cached yet.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import mlx.core as mx

from interp.cache import KVCache
from interp.slots import SlotLayer


class _Slot:
    """One layer's cache inside the traced step: capacity buffers written at ``offset``."""

    def __init__(self, keys: mx.array, values: mx.array, offset: mx.array):
        self.keys, self.values, self._start = keys, values, offset

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        self.keys = mx.slice_update(self.keys, keys, self._start, axes=(2,))
        self.values = mx.slice_update(self.values, values, self._start, axes=(2,))
        return self.keys, self.values


def supports(program) -> bool:
    """Whether every attention op of ``program`` is plain causal attention (see module doc)."""
    for node in program.nodes:
        if node.op == "attention" and any(node.attrs.get(name, 0) for name in ("window", "softcap", "alibi_max_bias")):
            return False
    return True


class CompiledStep:
    """Runs one-token steps of a GraphModel as a single compiled function."""

    def __init__(self, model, syms: dict[str, int]):
        """``syms``: the symbolic ints of the current call, kept up to date by the caller.

        They are sizes of the inputs, so a change of them is a change of input shape, on
        which MLX retraces anyway.
        """
        self.model = model
        self._syms = syms
        self._fn = mx.compile(self._trace_target())
        self._rows_fn: Callable | None = None

    @staticmethod
    def accepts(cache: list) -> bool:
        return all(type(c) is KVCache and c.keys is not None for c in cache)

    def _trace_target(self) -> Callable:
        model, syms = self.model, self._syms
        consts = model.consts
        steps = model._steps
        input_names = list(model.input_names)
        output_names = list(model.output_names)
        from interp.graph import RunContext

        def step(offset: mx.array, *arrays: mx.array) -> list[mx.array]:
            inputs = dict(zip(input_names, arrays[: len(input_names)], strict=True))
            buffers = arrays[len(input_names):]
            layers = len(buffers) // 2
            slots = [_Slot(k, v, offset) for k, v in zip(buffers[:layers], buffers[layers:], strict=True)]
            batch, capacity = buffers[0].shape[0], buffers[0].shape[2]
            written = mx.arange(capacity, dtype=mx.int32) <= offset
            env: dict[str, Any] = dict(consts)
            env.update(syms)
            env.update(inputs)
            ctx = RunContext(cache=slots, offset=offset, key_mask=mx.broadcast_to(written, (batch, capacity)))
            for run_node in steps:
                run_node(env, ctx)
            return ([env[name] for name in output_names] + [s.keys for s in slots] + [s.values for s in slots])

        return step

    def _rows_target(self) -> Callable:
        """The step for a slot batch (``interp/slots.py``): every row at its own column.

        Positions come in as inputs (``position_ids`` = the columns), so ``rope`` rotates
        per row; attention masks each row causally at its column.
        """
        model, syms = self.model, self._syms
        consts, steps = model.consts, model._steps
        input_names, output_names = list(model.input_names), list(model.output_names)
        from interp.graph import RunContext

        def step(columns: mx.array, *arrays: mx.array) -> list[mx.array]:
            inputs = dict(zip(input_names, arrays[: len(input_names)], strict=True))
            buffers = arrays[len(input_names):]
            layers = len(buffers) // 2
            slots = [SlotLayer(k, v, columns) for k, v in zip(buffers[:layers], buffers[layers:], strict=True)]
            env: dict[str, Any] = dict(consts)
            env.update(syms)
            env.update(inputs)
            ctx = RunContext(cache=slots, query_columns=columns[:, None])
            for run_node in steps:
                run_node(env, ctx)
            return ([env[name] for name in output_names] + [s.keys for s in slots] + [s.values for s in slots])

        return step

    def run_rows(self, inputs: dict[str, mx.array], layers: list, columns: mx.array) -> dict[str, Any]:
        """One token per row of a slot batch; ``layers`` hold ``keys``/``values`` buffers, updated here."""
        if self._rows_fn is None:
            self._rows_fn = mx.compile(self._rows_target())
        return self._call_in_place(self._rows_fn, columns, inputs, layers)

    def run(self, inputs: dict[str, mx.array], cache: list[KVCache], offset: int) -> dict[str, Any]:
        for c in cache:
            c.reserve(1)
        outputs = self._call_in_place(self._fn, mx.array(offset, dtype=mx.int32), inputs, cache)
        for c in cache:
            c.offset = offset + 1
        return outputs

    def _call_in_place(self, fn: Callable, where: mx.array, inputs: dict[str, mx.array], caches: list) -> dict:
        """``fn(where, *inputs, *keys, *values)``, the caches' buffers swapped for the ones it returns.

        The caches drop their references first, so MLX may update the buffers in place
        rather than copy them; on failure they get them back.
        """
        arrays = [inputs[name] for name in self.model.input_names]
        buffers = [c.keys for c in caches] + [c.values for c in caches]
        for c in caches:
            c.keys = c.values = None
        try:
            outs = fn(where, *arrays, *buffers)
        except BaseException:
            for i, c in enumerate(caches):
                c.keys, c.values = buffers[i], buffers[len(caches) + i]
            raise
        del buffers
        n_out, count = len(self.model.output_names), len(caches)
        for i, c in enumerate(caches):
            c.keys, c.values = outs[n_out + i], outs[n_out + count + i]
        return dict(zip(self.model.output_names, outs[:n_out], strict=True))
