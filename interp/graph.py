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
from interp.cache import KVCache
from interp.errors import PawError, ProgramError, WeightsError, first_line
from interp.last_position import last_position_cut
from interp.limits import RunBudget
from interp.ops import REGISTRY
from interp.ops.ternary import prepare_ternary_consts
from interp.program import Program, load_consts
from interp.state_cache import RecurrentState, make_state_cache
from interp.threads import release_on_thread_exit


@dataclass
class RunContext:
    """What context-needing ops (attention) see during one call."""

    cache: list | None
    #: the position of every row's first new token when positions are offset + arange(L)
    #: (the graph model made them); None when the caller gave positions. Lets ``rope``
    #: use mx.fast.rope. An int, or a scalar array inside the compiled step.
    offset: Any = None
    #: optional boolean [batch, keys] mask of which key positions (cache included) are real
    #: tokens; attention combines it with causality. Used for left-padded batches.
    key_mask: mx.array | None = None
    #: optional int [batch or 1, keys] position of every key, for a key mask whose masked keys
    #: take positions (they are real tokens hidden from some rows); None: masked keys are
    #: padding and take none (interp/ops/attention.py, ``key_positions``)
    key_positions: mx.array | None = None
    #: the key index of the first new query; None means the queries are the last keys the
    #: cache returns. The compiled step reads whole buffers and sets it to ``offset``.
    query_start: Any = None
    #: optional int [batch, length] cache column of every query, for rows that each sit at
    #: their own length in one cache (interp/slots.py); attention masks each row causally
    query_columns: mx.array | None = None
    #: values one call computes once and every layer reuses (the RoPE cos/sin table)
    shared: dict = field(default_factory=dict)
    #: bytes the call's node outputs take, against the memory budget (interp/limits.py)
    budget: RunBudget = field(default_factory=RunBudget)


_NodeRunner = Callable[[dict, RunContext], None]


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


def _check_dynamic(arg: schema.Arg, value: Any, where: str) -> None:
    """A symbolic int computed this call, held to the range its schema entry states."""
    for item in value if isinstance(value, list) else [value]:
        problem = arg.range_problem(item)
        if problem:
            raise ProgramError(f"{where}: attribute {arg.name!r} came to {item} at run time; it {problem}")


def _make_node_runner(index: int, node) -> _NodeRunner:
    """The node runner of ``node``: reads its inputs from the environment, writes its outputs.

    Errors name the node: a symbolic attribute out of range, an exception MLX raises while
    building the node's graph (a shape mismatch, a bad axis), or outputs that would
    outgrow the memory budget (checked before MLX allocates anything).
    """
    spec = schema.OPS[node.op]
    handler = REGISTRY[node.op]
    where = f"node {index} ({node.op})"
    getters = [_input_getter(arg.kind, v) for arg, v in zip(spec.inputs, node.inputs, strict=True)]
    static: dict[str, Any] = {}
    dynamic: dict[str, tuple[schema.Arg, Callable[[dict], Any]]] = {}
    for name, value in node.attrs.items():
        arg = spec.attr_by_name[name]
        is_dynamic, got = _attr_getter(arg.kind, value)
        if is_dynamic:
            dynamic[name] = (arg, got)
        else:
            static[name] = got
    outputs = node.outputs
    single = len(outputs) == 1 and not spec.outputs[-1].endswith("...")
    fn = handler.fn
    needs_context = handler.needs_context

    def run_node(env: dict, ctx: RunContext) -> None:
        args = [g(env) for g in getters]
        kwargs = dict(static)
        for name, (arg, get) in dynamic.items():
            kwargs[name] = value = get(env)
            _check_dynamic(arg, value, where)
        try:
            result = fn(ctx, *args, **kwargs) if needs_context else fn(*args, **kwargs)
            values = (result,) if single else tuple(result)
            if len(values) != len(outputs):
                raise ValueError(f"it gave {len(values)} outputs for {len(outputs)} names")
        except ProgramError as exc:  # an op's own check: say which node
            raise ProgramError(f"{where}: {exc}") from exc
        except PawError:
            raise
        except Exception as exc:  # MLX raises ValueError, IndexError, TypeError, OverflowError, ...
            raise ProgramError(f"{where} failed: {first_line(exc)}") from exc
        for name, value in zip(outputs, values, strict=True):
            if isinstance(value, mx.array):
                ctx.budget.spend(value.shape, value.itemsize, where)
            env[name] = value

    return run_node


class GraphModel:
    """An executable program. Call it like an mlx-lm model: ``logits = model(ids, cache)``."""

    def __init__(self, program: Program, consts: dict[str, mx.array], compile_decode: bool = True):
        self.program = program
        try:
            self.consts = prepare_ternary_consts(program.nodes, consts)  # packed ternary weights, laid out once
        except Exception as exc:  # numpy and MLX refuse malformed packed weights in several ways
            raise WeightsError(f"{program.directory}: cannot lay out its ternary weights: {first_line(exc)}") from exc
        self.input_names = [i["name"] for i in program.spec["inputs"]]
        self.output_names = [o["name"] for o in program.spec["outputs"]]
        self._node_runners = [_make_node_runner(index, node) for index, node in enumerate(program.nodes)]
        #: where a call that wants only the last position's logits slices the hidden state
        self._last_cut = last_position_cut(program.nodes, self.consts, self.output_names)
        self.num_layers = program.num_layers
        # mlx-lm sizes its default cache with len(model.layers).
        self.layers = [None] * self.num_layers
        #: run one-token decode steps as one MLX-compiled function (interp/compiled_step.py)
        self.compile_decode = compile_decode
        self._compiled_step = None

    @classmethod
    def from_program(cls, program: Program, compile_decode: bool = True) -> GraphModel:
        return cls(program, load_consts(program), compile_decode=compile_decode)

    def make_cache(self) -> list[KVCache | RecurrentState]:
        """The program's cache list: a KV cache per attention slot, then its recurrent states
        (``interp/state_cache.py``)."""
        return make_state_cache(self.num_layers, self.program.recurrent_states)

    def run(self, inputs: dict[str, mx.array], cache: list | None = None, offset: Any = None,
            key_mask: mx.array | None = None, query_columns: mx.array | None = None,
            last_only: bool = False, last_index: mx.array | None = None,
            key_positions: mx.array | None = None) -> dict[str, Any]:
        """Evaluate the graph on named inputs; returns the named outputs (lazy arrays).

        ``offset`` (positions are offset + arange) lets ``rope`` use mx.fast.rope;
        ``key_mask`` ([batch, keys] booleans) hides padding from attention (masked keys take
        no position), or real keys that then need ``key_positions`` ([batch or 1, keys] ints);
        ``query_columns`` ([batch, length]) places each row's queries in the cache.
        ``last_only``: the logits are wanted at the last position only, so the hidden state
        is sliced to it where ``interp/last_position.py`` found a cut (the LM head then runs
        once per row); ``logits`` is [batch, 1, vocab] either way. ``last_index`` ([batch]
        ints, with ``last_only``): the position each row wants instead, for right-padded rows
        of different lengths.
        """
        release_on_thread_exit()
        env: dict[str, Any] = dict(self.consts)
        env.update(inputs)
        ctx = RunContext(cache=cache, offset=offset, key_mask=key_mask, query_columns=query_columns,
                         key_positions=key_positions)
        if last_index is not None and (not last_only or last_index.ndim != 1):
            raise ProgramError(f"last_index must be one position per row, with last_only; got shape {last_index.shape}")
        return run_nodes(self, env, ctx, last_only, last_index)

    def __call__(self, tokens: mx.array, cache: list | None = None, positions: mx.array | None = None,
                 key_mask: mx.array | None = None, extra_inputs: dict[str, mx.array] | None = None,
                 last_only: bool = False) -> mx.array:
        """Logits for ``tokens`` ([batch, length] ids), continuing from the cache's offset.

        ``key_mask`` ([batch, cached + length] booleans) hides padding from attention.
        ``extra_inputs`` feeds graph inputs beyond the ids and positions (a LoRA rewrite's
        ``adapter_index``, interp/lora.py); one the graph declares but is not given is zeros [batch].
        ``last_only``: logits [batch, 1, vocab] of the last position only, as a prefill that
        samples the next token needs; the LM head then runs once per row where it can.
        """
        release_on_thread_exit()
        if tokens.ndim == 1:
            tokens = tokens[None]
        if tokens.ndim != 2 or tokens.size == 0:
            raise ProgramError(f"token ids must be a non-empty [batch, length] array, got shape {tokens.shape}")
        batch, length = tokens.shape
        offset = None
        if positions is None:
            offset = cache[0].offset if cache else 0
            positions = mx.broadcast_to(mx.arange(offset, offset + length, dtype=mx.int32), (batch, length))
        inputs = {"input_ids": tokens.astype(mx.int32)}
        if "position_ids" in self.input_names:
            inputs["position_ids"] = positions
        for name in self.input_names:
            if name not in inputs and name != "position_ids":
                inputs[name] = (extra_inputs or {}).get(name, mx.zeros((batch,), dtype=mx.int32))
        logits = self.forward(inputs, cache, offset, key_mask, last_only=last_only)["logits"]
        return self._checked_logits(logits, (batch, 1) if last_only else tokens.shape)

    def forward(self, inputs: dict[str, mx.array], cache: list | None = None, offset: int | None = None,
                key_mask: mx.array | None = None, last_only: bool = False) -> dict[str, Any]:
        """Like ``run``, but after a cached prefix a one-token step runs compiled when
        ``compile_decode`` allows (one token is its own last position, so ``last_only``
        changes nothing there), and so does a short input whose shape has been seen before
        (a program call, a chat turn: ``CompiledStep.prefill``)."""
        length = inputs["input_ids"].shape[-1]
        if self.compile_decode and offset is not None and key_mask is None and _compiled_step_type().accepts(cache):
            if length == 1:
                return self._compiled().run(inputs, cache, offset)
            outputs = self._compiled().prefill(inputs, cache, offset, last_only)
            if outputs is not None:
                return outputs
        return self.run(inputs, cache, offset, key_mask, last_only=last_only)

    def step_rows(self, tokens: mx.array, layers: list, columns: mx.array,
                  extra_inputs: dict[str, mx.array] | None = None) -> mx.array:
        """Logits [rows, 1, vocab] for one new token per row of a slot batch (``interp/slots.py``).

        ``tokens`` is [rows, 1]; row r's token sits at position and cache column
        ``columns[r]``. ``layers``: the KV layers, then a hybrid program's recurrent states
        with one row per slot. ``extra_inputs`` as for ``__call__`` (a LoRA rewrite's per-row
        ``adapter_index``). Compiled whole when ``compile_decode``.
        """
        release_on_thread_exit()
        inputs = {"input_ids": tokens.astype(mx.int32)}
        if "position_ids" in self.input_names:
            inputs["position_ids"] = columns[:, None]
        for name in self.input_names:
            if name not in inputs:
                inputs[name] = (extra_inputs or {}).get(name, mx.zeros((tokens.shape[0],), dtype=mx.int32))
        for layer in layers[: self.num_layers]:  # the KV layers; recurrent states follow (interp/slots.py)
            layer.columns = columns
        if self.compile_decode:
            return self._compiled().run_rows(inputs, layers, columns)["logits"]
        return self.run(inputs, layers, query_columns=columns[:, None])["logits"]

    def _compiled(self):
        if self._compiled_step is None:
            self._compiled_step = _compiled_step_type()(self)
        return self._compiled_step

    def _checked_logits(self, logits: Any, tokens_shape: tuple) -> mx.array:
        if not isinstance(logits, mx.array) or logits.ndim != 3 or tuple(logits.shape[:2]) != tuple(tokens_shape):
            shape = getattr(logits, "shape", type(logits).__name__)
            raise ProgramError(f"{self.program.directory}: the program's logits have shape {shape}; "
                               f"expected [batch, length, vocab] for token ids of shape {tokens_shape}")
        return logits


def run_nodes(model: GraphModel, env: dict[str, Any], ctx: RunContext, last_only: bool = False,
              last_index: mx.array | None = None) -> dict[str, Any]:
    """Every node of ``model`` over ``env`` (constants and inputs); returns the named outputs.

    With ``last_only`` the hidden state is sliced to the wanted position at the model's
    last-position cut, where it has one (else the full logits are sliced at the end).
    Shared by ``GraphModel.run`` and the traced steps of ``interp/compiled_step.py``.
    """
    cut = model._last_cut if last_only and "input_ids" in env else None
    length = env["input_ids"].shape[-1] if cut is not None else 0
    sliced = False
    for index, run_node in enumerate(model._node_runners):
        if cut is not None and index == cut.node:
            hidden = env[cut.value]
            if isinstance(hidden, mx.array) and hidden.ndim == 3 and hidden.shape[1] == length:
                env[cut.value], sliced = _wanted_positions(hidden, last_index), True
        run_node(env, ctx)
    outputs = {name: env[name] for name in model.output_names}
    logits = outputs.get("logits")
    if last_only and not sliced and isinstance(logits, mx.array) and logits.ndim == 3:
        outputs["logits"] = _wanted_positions(logits, last_index)  # no cut: the head ran everywhere
    return outputs


def _wanted_positions(values: mx.array, last_index: mx.array | None) -> mx.array:
    """[batch, 1, ...] of ``values`` [batch, length, ...]: the last position, or row r's ``last_index[r]``."""
    if last_index is None:
        return values[:, -1:]
    return mx.take_along_axis(values, last_index.astype(mx.int32).reshape(-1, 1, 1), axis=1)


def _compiled_step_type():
    from interp.compiled_step import CompiledStep  # it builds on this module

    return CompiledStep
