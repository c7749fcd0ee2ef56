"""mx.compile for the decode step: the whole step where it can be, else pure segments.

``CompiledDecoder.run`` first computes the step's symbolic ints, then hands the step to
``interp/compiled_step.py`` (one compiled function over fixed-capacity KV buffers) when
the program and cache allow it. Otherwise (sliding windows, soft-capping, ALiBi, a
foreign cache) attention must see the real key count, so the whole step would retrace
every token. Then the node list is cut at every op that needs the run's context (``attention``):
the pieces between are pure functions of their live-in tensors and are each wrapped in
``mx.compile`` (traced once, elementwise chains fused, no Python per node afterwards);
the attention ops run as usual between them and own the cache.

Symbolic ints (sizes of the inputs) are computed once per call before the segments; a
segment sees them through its closure and also takes ``input_ids`` as an input, so a
change of batch or length (which is what changes them) makes MLX retrace. Programs with
symbolic ints of intermediate tensors are not cut (``supported`` is False): the caller
runs them uncompiled.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx

from interp import compiled_step, schema
from interp.compiled_step import CompiledStep
from interp.ops import REGISTRY


def _names(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)):
        return [n for item in value for n in _names(item)]
    return []


def _references(spec: schema.OpSpec, node) -> set[str]:
    """Names of the values a node reads (attribute strings such as dtypes excluded)."""
    refs = set(_names(list(node.inputs)))
    for name, value in node.attrs.items():
        if spec.attr_by_name[name].kind in (schema.INT, schema.INTS):
            refs.update(_names(value))
    return refs


@dataclass
class _Segment:
    steps: list = field(default_factory=list)
    used: set = field(default_factory=set)
    defined: list = field(default_factory=list)
    live_in: list = field(default_factory=list)
    live_out: list = field(default_factory=list)
    context: bool = False  # an op that needs the run context (runs uncompiled)
    fn: Callable | None = None


class CompiledDecoder:
    """Runs a GraphModel's one-token steps compiled: whole where it can, else in segments."""

    def __init__(self, model):
        self.model = model
        self.supported = True
        #: the whole step as one compiled function, for programs and caches that allow it
        self.whole_step: CompiledStep | None = None
        self._syms: dict[str, int] = {}
        self._prelude: list = []
        self._segments: list[_Segment] = []
        inputs = set(model.input_names)
        sym_names: set[str] = set()
        current = _Segment()
        for node, step in zip(model.program.nodes, model._steps, strict=True):
            spec = schema.OPS[node.op]
            refs = _references(spec, node)
            if spec.symbolic:
                if not refs <= inputs | sym_names:
                    self.supported = False  # a size of an intermediate tensor
                    return
                self._prelude.append(step)
                sym_names.update(node.outputs)
                continue
            if REGISTRY[node.op].needs_context:
                if current.steps:
                    self._segments.append(current)
                self._segments.append(_Segment([step], refs, list(node.outputs), context=True))
                current = _Segment()
                continue
            current.steps.append(step)
            current.used |= refs
            current.defined.extend(node.outputs)
        if current.steps:
            self._segments.append(current)
        self._sym_names = sym_names
        self._link(set(model.consts), sym_names)
        if compiled_step.supports(model.program):
            self.whole_step = CompiledStep(model, self._syms)

    def _link(self, consts: set[str], syms: set[str]) -> None:
        needed_later = set(self.model.output_names)
        for seg in reversed(self._segments):
            defined = set(seg.defined)
            seg.live_out = sorted(defined & needed_later)
            seg.live_in = sorted(seg.used - defined - consts - syms)
            needed_later = (needed_later - defined) | set(seg.live_in)
            if not seg.context:
                seg.fn = self._compile(seg, sorted(seg.used & consts))

    def _compile(self, seg: _Segment, const_names: list[str]) -> Callable:
        consts = {name: self.model.consts[name] for name in const_names}
        syms = self._syms
        steps, live_in, live_out = seg.steps, seg.live_in, seg.live_out
        from interp.graph import RunContext

        def segment(offset: mx.array, input_ids: mx.array, *arrays: mx.array) -> list[mx.array]:
            del input_ids  # an input only so that a new batch/length shape retraces
            env: dict[str, Any] = dict(consts)
            env.update(syms)
            env.update(zip(live_in, arrays, strict=True))
            ctx = RunContext(cache=None, offset=offset)
            for step in steps:
                step(env, ctx)
            return [env[name] for name in live_out]

        return mx.compile(segment)

    def _compute_syms(self, inputs: dict[str, mx.array], ctx) -> dict[str, Any]:
        env: dict[str, Any] = dict(inputs)
        for step in self._prelude:
            step(env, ctx)
        self._syms.clear()
        self._syms.update({name: env[name] for name in self._sym_names})
        return env

    def run_rows(self, inputs: dict[str, mx.array], layers: list, columns: mx.array) -> dict[str, Any] | None:
        """A slot batch's step as one compiled function, or None where the whole step cannot compile."""
        from interp.graph import RunContext

        if self.whole_step is None:
            return None
        self._compute_syms(inputs, RunContext(cache=None))
        return self.whole_step.run_rows(inputs, layers, columns)

    def run(self, inputs: dict[str, mx.array], cache: list, offset: int) -> dict[str, Any]:
        from interp.graph import RunContext

        ctx = RunContext(cache=cache, offset=offset)
        env = self._compute_syms(inputs, ctx)
        if self.whole_step is not None and CompiledStep.accepts(cache):
            return self.whole_step.run(inputs, cache, offset)
        offset_array = mx.array(offset, dtype=mx.int32)
        ids = inputs["input_ids"]
        for seg in self._segments:
            if seg.context:
                for step in seg.steps:
                    local = {name: env[name] for name in seg.used if name in env}
                    for name in seg.used:
                        if name not in local:
                            local[name] = self.model.consts[name]
                    step(local, ctx)
                    env.update({name: local[name] for name in seg.defined})
            else:
                outs = seg.fn(offset_array, ids, *[env[name] for name in seg.live_in])
                env.update(zip(seg.live_out, outs, strict=True))
        return {name: env[name] for name in self.model.output_names}
