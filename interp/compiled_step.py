"""The one-token decode step as one ``mx.compile``d function over fixed-capacity KV buffers.

Traced whole, a step fuses its elementwise chains and runs as one call instead of a graph
built node by node every token (figures in docs/speed.md). A traced step must keep its
shapes from token to token, so attention reads each layer's ``KVCache`` buffers at their
capacity (they grow 256 positions at a time): the new keys and values are written at
``offset`` with ``mx.slice_update``, and attention masks the keys from that offset
(causality, sliding windows and chunks; ALiBi's bias and soft-capping need nothing more). The
offset is an array, so a new position does not retrace; the step retraces only when the
buffers grow or the batch changes.

A hybrid program's recurrent states (``interp/state_cache.py``: conv, delta, SSM and LRU states)
are fixed-size arrays: they go in and come out of the traced step beside the KV buffers,
one each (``CARRIED`` names the attribute that holds each kind's array).

Caches other than paw's own ``KVCache`` and the states in ``CARRIED`` (an mlx-lm cache passed in) and a
first step with nothing cached run the plain interpreter, ``GraphModel.run``: ``accepts``
says which.

``run_rows`` is the same step for a slot batch (``interp/slots.py``, the server's
continuous batching): every row at its own cache column, the columns an array input.

``prefill`` traces a short input after a cached prefix the same way (a program call's
input, a chat turn; at most ``SHORT_PREFILL`` tokens), with the LM head at the last
position when that is all the caller wants. A new input length is a new trace, which
costs more than an uncompiled pass (docs/speed.md), so a shape is traced the second time
it is seen (a one-off length never pays for a trace) and at most ``MAX_PREFILL_TRACES``
shapes are.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import mlx.core as mx

from interp.cache import KVCache
from interp.graph import GraphModel, RunContext, run_nodes
from interp.slots import SlotLayer
from interp.state_cache import STATE_ARRAY, RecurrentState


class _Slot:
    """One layer's cache inside the traced step: capacity buffers written at ``offset``."""

    def __init__(self, keys: mx.array, values: mx.array, offset: mx.array):
        self.keys, self.values, self._start = keys, values, offset

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        self.keys = mx.slice_update(self.keys, keys, self._start, axes=(2,))
        self.values = mx.slice_update(self.values, values, self._start, axes=(2,))
        return self.keys, self.values


#: the recurrent state kinds the step carries -> the attribute holding each one's array
CARRIED: dict[type, str] = STATE_ARRAY

#: the longest input (tokens per row) that ``CompiledStep.prefill`` traces
SHORT_PREFILL = 16
#: the most short-prefill shapes one model traces; others run the plain interpreter
MAX_PREFILL_TRACES = 64


class CompiledStep:
    """Runs one-token steps (and short inputs after a cached prefix) of a GraphModel as
    single compiled functions."""

    def __init__(self, model: GraphModel):
        self.model = model
        self._fn = mx.compile(self._trace_target())
        self._rows_fn: Callable | None = None
        self._prefill_fns: dict[bool, Callable] = {}
        #: short-prefill shapes seen once (not traced yet) and those traced
        self._seen: set[tuple] = set()
        self._traced: set[tuple] = set()
        #: (function, input shapes and dtypes) already called: MLX traces a function on a new one
        self._signatures: set[tuple] = set()

    @staticmethod
    def accepts(cache: list | None) -> bool:
        """Whether ``cache`` can take the compiled step: paw's ``KVCache``, each holding keys, then
        (a hybrid program) its recurrent states (``CARRIED``), each holding its array."""
        return bool(cache) and all(
            (type(c) is KVCache and c.keys is not None)
            or (type(c) in CARRIED and getattr(c, CARRIED[type(c)]) is not None) for c in cache)

    def _trace_target(self, last_only: bool = False) -> Callable:
        """The step for new positions shared by every row: ``offset`` (an array) is where the
        first one writes. ``last_only``: logits at the last position only (see ``run_nodes``)."""
        def context(slots: list, offset: mx.array) -> RunContext:
            return RunContext(cache=slots, offset=offset, query_start=offset)

        return self._step_function(_Slot, context, last_only)

    def _rows_target(self) -> Callable:
        """The step for a slot batch: positions come in as inputs (``position_ids`` = the
        columns), so ``rope`` rotates per row; attention masks each row at its column."""
        def context(slots: list, columns: mx.array) -> RunContext:
            return RunContext(cache=slots, query_columns=columns[:, None])

        return self._step_function(SlotLayer, context)

    def _step_function(self, make_slot: Callable, make_context: Callable[[list, mx.array], RunContext],
                       last_only: bool = False) -> Callable:
        """``step(where, *inputs, *keys, *values, *states)``: every node runner over KV cache slots made
        by ``make_slot(keys, values, where)`` and recurrent states holding ``states``, in the cache list's
        order; returns the outputs, then the new keys, values and states."""
        model = self.model
        consts = model.consts
        input_names = list(model.input_names)
        output_names = list(model.output_names)
        layers = model.num_layers
        kinds = [type(state) for state in model.make_cache()[layers:]]

        def step(where: mx.array, *arrays: mx.array) -> list[mx.array]:
            buffers = arrays[len(input_names):]
            slots = [make_slot(k, v, where) for k, v in zip(buffers[:layers], buffers[layers : 2 * layers],
                                                            strict=True)]
            states = [_holding(kind, array) for kind, array in zip(kinds, buffers[2 * layers :], strict=True)]
            env: dict[str, Any] = dict(consts)
            # Symbolic ints (sizes of the inputs) become constants of the trace: a new size
            # is a new input shape, on which MLX retraces.
            env.update(zip(input_names, arrays[: len(input_names)], strict=True))
            outputs = run_nodes(model, env, make_context(slots + states, where), last_only)
            return ([outputs[name] for name in output_names] + [s.keys for s in slots] + [s.values for s in slots]
                    + [getattr(s, CARRIED[type(s)]) for s in states])

        return step

    def run(self, inputs: dict[str, mx.array], cache: list[KVCache], offset: int) -> dict[str, Any]:
        """The step's outputs for one new token per row at position ``offset``; advances ``cache``."""
        for c in cache[: self.model.num_layers]:
            c.reserve(1)
        outputs = self._call_in_place(self._fn, mx.array(offset, dtype=mx.int32), inputs, cache)
        for c in cache:
            c.offset = offset + 1
        return outputs

    def prefill(self, inputs: dict[str, mx.array], cache: list[KVCache], offset: int,
                last_only: bool = False) -> dict[str, Any] | None:
        """The outputs for a short input (every row ``length`` new tokens from ``offset``),
        traced, advancing ``cache``; None when this shape is not (yet) worth a trace: the
        caller runs the plain interpreter on the same cache."""
        batch, length = inputs["input_ids"].shape
        if length > SHORT_PREFILL:
            return None
        for c in cache[: self.model.num_layers]:
            c.reserve(length)
        capacity = cache[0].keys.shape[2] if self.model.num_layers else 0
        shape = (batch, length, capacity, last_only)
        if shape not in self._traced:
            if shape not in self._seen or len(self._traced) >= MAX_PREFILL_TRACES:
                if len(self._seen) >= 4 * MAX_PREFILL_TRACES:  # many one-off shapes: start counting again
                    self._seen.clear()
                self._seen.add(shape)
                return None
            self._traced.add(shape)
        if last_only not in self._prefill_fns:
            # the full-logits prefill is the decode step's own function at a new shape
            self._prefill_fns[last_only] = mx.compile(self._trace_target(True)) if last_only else self._fn
        outputs = self._call_in_place(self._prefill_fns[last_only], mx.array(offset, dtype=mx.int32), inputs, cache)
        for c in cache:
            c.offset = offset + length
        return outputs

    def run_rows(self, inputs: dict[str, mx.array], layers: list, columns: mx.array) -> dict[str, Any]:
        """One token per row of a slot batch; ``layers`` hold ``keys``/``values`` buffers, updated here."""
        if self._rows_fn is None:
            self._rows_fn = mx.compile(self._rows_target())
        return self._call_in_place(self._rows_fn, columns, inputs, layers)

    def _call_in_place(self, fn: Callable, where: mx.array, inputs: dict[str, mx.array], caches: list) -> dict:
        """``fn(where, *inputs, *keys, *values, *states)``, the caches' buffers swapped for the ones it returns.

        The caches drop their references first, so MLX may update the buffers in place
        rather than copy them; on failure they get them back.
        """
        arrays = [inputs[name] for name in self.model.input_names]
        layers, states = caches[: self.model.num_layers], caches[self.model.num_layers :]
        buffers = ([c.keys for c in layers] + [c.values for c in layers]
                   + [getattr(s, CARRIED[type(s)]) for s in states])
        signature = (id(fn), tuple((a.shape, a.dtype) for a in [where, *arrays, *buffers]))
        if signature not in self._signatures:
            # MLX traces ``fn`` for a signature it has not seen, and its graph simplification
            # reads every evaluated 0-d array of the trace (a program's scalar constant) twice,
            # trusting both reads: one still being computed by the previous call's async_eval
            # can become ready in between, and MLX then crashes (a segmentation fault). So
            # nothing is left in flight while it traces.
            mx.synchronize()
            self._signatures.add(signature)
        for c in layers:
            c.keys = c.values = None
        for s in states:
            setattr(s, CARRIED[type(s)], None)
        try:
            outs = fn(where, *arrays, *buffers)
        except BaseException:
            _put_back(layers, states, buffers)
            raise
        del buffers
        n_out = len(self.model.output_names)
        _put_back(layers, states, outs[n_out:])
        return dict(zip(self.model.output_names, outs[:n_out], strict=True))


def _holding(kind: type, array: mx.array) -> RecurrentState:
    """A recurrent state of ``kind`` inside the traced step, holding ``array``."""
    state = kind()
    setattr(state, CARRIED[kind], array)
    return state


def _put_back(layers: list, states: list, buffers: list) -> None:
    """Give the KV caches their keys and values and the recurrent states their arrays, in ``buffers``' order."""
    count = len(layers)
    for i, c in enumerate(layers):
        c.keys, c.values = buffers[i], buffers[count + i]
    for i, s in enumerate(states):
        setattr(s, CARRIED[type(s)], buffers[2 * count + i])
