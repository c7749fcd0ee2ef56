"""Run a program: a model object built from prog.json that MLX executes lazily.

``GraphModel`` walks the node list once per call, calling one MLX function per node;
nothing is computed until the caller evaluates the result, so the interpreter only
builds the graph MLX runs. It presents the interface mlx-lm's generation expects
(``model(tokens, cache=...)`` returning logits, ``layers``, ``make_cache``), so the
same object runs under paw's loop or mlx-lm's.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx

from interp import schema
from interp.cache import KVCache, make_cache
from interp.errors import WeightsError
from interp.ops import REGISTRY
from interp.ops.ternary import prepare_ternary_consts
from interp.program import Program


@dataclass
class RunContext:
    """What context-needing ops (attention) see during one call."""

    cache: list | None
    #: the position of every row's first new token when positions are offset + arange(L)
    #: (the graph model made them); None when the caller gave positions. Lets ``rope``
    #: use mx.fast.rope. An int, or a scalar array inside compiled segments.
    offset: Any = None
    #: optional boolean [batch, keys] mask of which key positions (cache included) are real
    #: tokens; attention combines it with causality. Used for left-padded batches.
    key_mask: mx.array | None = None
    #: optional int [batch, length] cache column of every query, for rows that each sit at
    #: their own length in one cache (interp/slots.py); attention masks each row causally
    query_columns: mx.array | None = None
    #: values one call computes once and every layer reuses (the RoPE cos/sin table)
    shared: dict = field(default_factory=dict)


_Step = Callable[[dict, RunContext], None]


def _input_getter(kind: str, value: Any) -> Callable[[dict], Any]:
    if value is None:
        return lambda env: None
    if kind == schema.TENSOR_LIST:
        names = list(value)
        return lambda env: [env[n] for n in names]
    if isinstance(value, str):
        return lambda env: env[value]
    return lambda env: value  # a number literal


def _attr_getter(kind: str, value: Any) -> tuple[bool, Callable[[dict], Any] | Any]:
    """(is_dynamic, getter-or-value): attrs naming symbolic ints are resolved per call."""
    if kind == schema.INT and isinstance(value, str):
        return True, lambda env: env[value]
    if kind == schema.INTS and any(isinstance(v, str) for v in value):
        items = list(value)
        return True, lambda env: [env[v] if isinstance(v, str) else v for v in items]
    if kind == schema.INTS:
        return False, list(value)
    return False, value


def _compile_node(node) -> _Step:
    spec = schema.OPS[node.op]
    handler = REGISTRY[node.op]
    getters = [_input_getter(arg.kind, v) for arg, v in zip(spec.inputs, node.inputs, strict=True)]
    static: dict[str, Any] = {}
    dynamic: dict[str, Callable[[dict], Any]] = {}
    for name, value in node.attrs.items():
        is_dynamic, got = _attr_getter(spec.attr_by_name[name].kind, value)
        (dynamic if is_dynamic else static)[name] = got
    outputs = node.outputs
    single = len(outputs) == 1 and not spec.outputs[-1].endswith("...")
    fn = handler.fn
    needs_context = handler.needs_context

    def step(env: dict, ctx: RunContext) -> None:
        args = [g(env) for g in getters]
        kwargs = dict(static)
        for name, get in dynamic.items():
            kwargs[name] = get(env)
        result = fn(ctx, *args, **kwargs) if needs_context else fn(*args, **kwargs)
        if single:
            env[outputs[0]] = result
        else:
            for name, value in zip(outputs, result, strict=True):
                env[name] = value

    return step


class GraphModel:
    """An executable program. Call it like an mlx-lm model: ``logits = model(ids, cache)``."""

    def __init__(self, program: Program, consts: dict[str, mx.array], compile_decode: bool = True):
        self.program = program
        self.consts = prepare_ternary_consts(program.nodes, consts)  # packed ternary weights, laid out once
        self.input_names = [i["name"] for i in program.spec["inputs"]]
        self.output_names = [o["name"] for o in program.spec["outputs"]]
        self._steps = [_compile_node(node) for node in program.nodes]
        self.num_layers = program.num_layers
        # mlx-lm sizes its default cache with len(model.layers).
        self.layers = [None] * self.num_layers
        #: run one-token steps compiled (interp/compiled_step.py, or segments: interp/compiled.py)
        self.compile_decode = compile_decode
        self._decoder = None

    @classmethod
    def from_program(cls, program: Program, compile_decode: bool = True) -> GraphModel:
        try:
            consts = mx.load(str(program.consts_path))
        except Exception as exc:  # mlx raises plain RuntimeError/ValueError for bad files
            raise WeightsError(f"cannot read {program.consts_path}: {exc}") from None
        return cls(program, consts, compile_decode=compile_decode)

    def make_cache(self) -> list[KVCache]:
        return make_cache(self.num_layers)

    def run(self, inputs: dict[str, mx.array], cache: list | None = None, offset: Any = None,
            key_mask: mx.array | None = None, query_columns: mx.array | None = None) -> dict[str, Any]:
        """Evaluate the graph on named inputs; returns the named outputs (lazy arrays).

        ``offset`` (positions are offset + arange) lets ``rope`` use mx.fast.rope;
        ``key_mask`` ([batch, keys] booleans) hides padding from attention;
        ``query_columns`` ([batch, length]) places each row's queries in the cache.
        """
        env: dict[str, Any] = dict(self.consts)
        env.update(inputs)
        ctx = RunContext(cache=cache, offset=offset, key_mask=key_mask, query_columns=query_columns)
        for step in self._steps:
            step(env, ctx)
        return {name: env[name] for name in self.output_names}

    def __call__(self, tokens: mx.array, cache: list | None = None, positions: mx.array | None = None,
                 key_mask: mx.array | None = None) -> mx.array:
        """Logits for ``tokens`` ([batch, length] ids), continuing from the cache's offset.

        ``key_mask`` ([batch, cached + length] booleans) hides padding from attention.
        """
        if tokens.ndim == 1:
            tokens = tokens[None]
        batch, length = tokens.shape
        offset = None
        if positions is None:
            offset = cache[0].offset if cache else 0
            positions = mx.broadcast_to(mx.arange(offset, offset + length, dtype=mx.int32), (batch, length))
        inputs = {"input_ids": tokens.astype(mx.int32)}
        if "position_ids" in self.input_names:
            inputs["position_ids"] = positions
        if self.compile_decode and length == 1 and offset is not None and cache and key_mask is None:
            decoder = self._compiled()
            if decoder is not None:
                return decoder.run(inputs, cache, offset)["logits"]
        return self.run(inputs, cache, offset, key_mask)["logits"]

    def step_rows(self, tokens: mx.array, layers: list, columns: mx.array) -> mx.array:
        """Logits [rows, 1, vocab] for one new token per row of a slot batch (``interp/slots.py``).

        ``tokens`` is [rows, 1]; row r's token sits at position and cache column
        ``columns[r]``. Compiled whole where the program allows (``compile_decode``).
        """
        inputs = {"input_ids": tokens.astype(mx.int32)}
        if "position_ids" in self.input_names:
            inputs["position_ids"] = columns[:, None]
        for layer in layers:
            layer.columns = columns
        if self.compile_decode:
            decoder = self._compiled()
            if decoder is not None:
                out = decoder.run_rows(inputs, layers, columns)
                if out is not None:
                    return out["logits"]
        return self.run(inputs, layers, query_columns=columns[:, None])["logits"]

    def _compiled(self):
        if self._decoder is None:
            from interp.compiled import CompiledDecoder

            self._decoder = CompiledDecoder(self)
        return self._decoder if self._decoder.supported else None
