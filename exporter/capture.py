"""Capture a Hugging Face causal LM with torch.export, attention as one op of ours.

transformers routes every attention call through its attention interface. We register
an implementation named "paw" that calls the custom op ``paw::attention`` with only the
new positions' q, k, v; the model runs with ``use_cache=False``. The exported graph
therefore holds no cache at all: the interpreter owns it and appends to it inside the
attention op, and the sequence length can stay dynamic.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections.abc import Iterator

import torch
from torch.export import Dim

from exporter import recipes
from exporter.attention_reference import attention_reference
from exporter.experts import experts_mode, use_paw_experts
from exporter.masks import AttentionPattern, paw_mask
from interp import schema
from interp.errors import ExportError

ATTN_IMPLEMENTATION = "paw"


@torch.library.custom_op("paw::attention", mutates_args=())
def paw_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int, scale: float, window: int, softcap: float,
    alibi_max_bias: float = 0.0, sinks: torch.Tensor | None = None, chunk: int = 0, keep: torch.Tensor | None = None,
) -> torch.Tensor:
    """The program's ``attention`` op, without a cache (exporter/attention_reference.py)."""
    return attention_reference(q, k, v, scale=scale, window=window, softcap=softcap, alibi_max_bias=alibi_max_bias,
                               sinks=sinks, chunk=chunk, keep=keep)


@paw_attention.register_fake
def _paw_attention_fake(q, k, v, layer, scale, window, softcap, alibi_max_bias=0.0, sinks=None, chunk=0, keep=None):
    return torch.empty(q.shape[:-1] + (v.shape[-1],), dtype=q.dtype, device=q.device)


def _paw_attention_interface(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                             sliding_window=None, softcap=None, **kwargs):
    """transformers attention-interface entry: hands q, k, v to ``paw::attention``."""
    chunk = 0
    if isinstance(attention_mask, AttentionPattern):
        # eager attention (the reference) windows and chunks through the mask only; the kwarg is a hint for kernels
        sliding_window, chunk = attention_mask.window, attention_mask.chunk
    elif isinstance(attention_mask, torch.Tensor):
        # a mask the model built itself (Doge's learned bias per key): the op would drop it
        raise ExportError(f"cannot export: {type(module).__name__} hands attention a mask of its own making; "
                          "the attention op takes no mask or bias")
    layer = getattr(module, "layer_idx", None) or 0  # the lowering numbers attention calls itself
    scale = float(scaling) if scaling is not None else query.shape[-1] ** -0.5
    out = torch.ops.paw.attention(query, key, value, int(layer), scale, int(sliding_window or 0), float(softcap or 0.0),
                                  0.0, kwargs.get("s_aux"), chunk)  # s_aux: gpt-oss's attention sinks
    return out.transpose(1, 2).contiguous(), None


_registered = False


def register_attention() -> None:
    """Make attn_implementation="paw" known to transformers (idempotent)."""
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTN_IMPLEMENTATION, _paw_attention_interface)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, paw_mask)
    _registered = True


class _LogitsOnly(torch.nn.Module):
    """(input_ids, position_ids) -> logits, the signature every program has."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, position_ids=position_ids, use_cache=False).logits


def use_paw_attention(model: torch.nn.Module) -> None:
    register_attention()
    can_set = getattr(model, "_can_set_attn_implementation", None)
    if callable(can_set) and not can_set():
        # Hand-written attention (BLOOM): exporter/recipes.py routes it to paw::attention.
        model.config._attn_implementation = ATTN_IMPLEMENTATION
        return
    if hasattr(model, "set_attn_implementation"):
        try:
            model.set_attn_implementation(ATTN_IMPLEMENTATION)
            return
        except Exception:  # older/newer transformers may refuse unknown names; fall back
            pass
    model.config._attn_implementation = ATTN_IMPLEMENTATION


#: config.layer_types values (transformers 5's names) that programs express: attention with a KV
#: cache, whole, windowed or chunked ("attention": Jamba's layers_block_type), and MLP-only layers
#: (nemotron_h's "moe" and "mlp")
SUPPORTED_LAYER_TYPES = frozenset({"full_attention", "sliding_attention", "chunked_attention", "attention", "moe",
                                   "mlp", "dense", "sparse"})
#: layer types with recurrent state instead of (or beside) a KV cache (transformers' cache_utils:
#: "linear-attention-shaped ... recurrent state only")
RECURRENT_LAYER_TYPES = frozenset({"linear_attention", "conv", "hybrid", "hybrid_sliding", "mamba"})


def check_layer_types(model: torch.nn.Module) -> None:
    """Refuse, by name and before any tracing, a model whose layers a program cannot express.

    A program's state is attention's KV cache plus the recurrent states of the layers a recipe
    captures (``Recipe.layer_types``): LFM2's ``conv``, the Gated DeltaNet families', Mamba2 and
    Mamba 1 mixers' and RecurrentGemma's RG-LRU blocks' ``linear_attention`` (Jamba's ``mamba``);
    other recurrent layers (MiniMax's lightning attention, RWKV) cannot run through it.
    Indexer-selected attention (``indexed_attention``) runs where a recipe captures its indexer
    (DeepSeek Sparse Attention, ``exporter/indexed.py``), and only there.
    """
    config = model.config
    kinds = []
    for key in ("layer_types", "layers_block_type"):
        value = getattr(config, key, None)
        kinds += [kind for kind in value if isinstance(kind, str)] if isinstance(value, (list, tuple)) else []
    recipe = recipes.RECIPES.get(getattr(config, "model_type", ""))
    captured = recipe.layer_types if recipe is not None else frozenset()
    unsupported = sorted(set(kinds) - SUPPORTED_LAYER_TYPES - captured)
    if not unsupported:
        return
    name = type(model).__name__
    if set(unsupported) & RECURRENT_LAYER_TYPES:
        raise ExportError(f"cannot export: {name} has recurrent layers ({', '.join(unsupported)}); a paw program's "
                          "state is attention's KV cache, short convolutions' conv state, gated delta rules' "
                          "matrices, Mamba mixers' SSM state and RG-LRUs' state, so other recurrent and state-space "
                          "layers are not supported")
    raise ExportError(f"cannot export: {name} has {', '.join(unsupported)} layers; paw's attention op is causal "
                      "attention over the whole cache, a sliding window or chunks")


@contextlib.contextmanager
def _rope_within_context(model: torch.nn.Module) -> Iterator[None]:
    """Rotary embeddings of rope_type "dynamic" (NTK) run as their plain selves during capture.

    Dynamic NTK rescales the frequencies only once a sequence outgrows
    max_position_embeddings, with a Python ``if`` torch.export cannot trace. That length is
    the program's context (``context_length``), so within it the frequencies are the ones
    the module already holds and the rescaling branch is dead.
    """
    def plain(kind):
        return "default" if isinstance(kind, str) and "dynamic" in kind else kind

    changed = []
    for module in model.modules():
        kind = getattr(module, "rope_type", None)
        new = {key: plain(value) for key, value in kind.items()} if isinstance(kind, dict) else plain(kind)
        if new != kind:
            changed.append((module, kind))
            module.rope_type = new
    try:
        yield
    finally:
        for module, kind in changed:
            module.rope_type = kind


def context_length(config) -> int:
    """The positions a program of ``config`` declares (4096 when the config names none); ExportError,
    before the capture, for more than a program may declare (``interp/program.py`` refuses it at load)."""
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            if value > schema.INT32_MAX:
                raise ExportError(f"the config's {key} is {value}; a program holds at most {schema.INT32_MAX} "
                                  "positions")
            return value
    return 4096


#: Capture modes tried in order. Non-strict export traces with the real Python (no
#: dynamo bytecode analysis), which is faster (docs/speed.md) and gives the same program
#: node for node. Strict stays as the fallback for models whose Python non-strict tracing
#: cannot follow.
CAPTURE_MODES = (False, True)


def capture(model: torch.nn.Module, strict: bool | None = None, decompose: bool | None = None,
            experts: str = "sparse") -> torch.export.ExportedProgram:
    """torch.export the model with dynamic batch and sequence length.

    ``strict`` None tries non-strict capture first and falls back to strict. ``decompose``
    None runs ``run_decompositions`` only when the captured graph needs it
    (``needs_decomposition``); True always runs it. ``experts``: how mixture-of-experts
    blocks run, "sparse" (only the routed experts) or "dense" (exporter/experts.py).
    """
    check_layer_types(model)
    with implementations_kept(model):
        return _capture(model, strict, decompose, experts)


#: a config's choice of attention and experts functions, as transformers stores it
_IMPLEMENTATION_FIELDS = ("_attn_implementation_internal", "_experts_implementation_internal")


@contextlib.contextmanager
def implementations_kept(model: torch.nn.Module) -> Iterator[None]:
    """Within the block the model may be switched to paw's attention and experts; after it, every config
    of the model (sub-configs included) names the implementations it named before, so the caller's model
    runs as it did (transformers' own attention, not a capture-only one that refuses to run eagerly)."""
    configs, pending = {}, [m.config for m in model.modules() if hasattr(m, "config")]
    while pending:
        config = pending.pop()
        if id(config) in configs or not hasattr(config, "__dict__"):
            continue
        configs[id(config)] = config
        pending += [getattr(config, key, None) for key in getattr(config, "sub_configs", {})]
    saved = [(config, {key: config.__dict__[key] for key in _IMPLEMENTATION_FIELDS if key in config.__dict__})
             for config in configs.values() if config is not None]
    training = model.training
    try:
        yield
    finally:
        for config, fields in saved:
            config.__dict__.update(fields)
        model.train(training)


def _capture(model: torch.nn.Module, strict: bool | None, decompose: bool | None,
             experts: str) -> torch.export.ExportedProgram:
    use_paw_attention(model)
    use_paw_experts(model)
    model.eval()
    max_len = context_length(model.config)
    wrapper = _LogitsOnly(model)
    # Length >= 2 examples avoid torch specialising the dims to 0/1.
    ids = torch.zeros((2, 4), dtype=torch.long)
    pos = torch.arange(4).unsqueeze(0).expand(2, 4).contiguous()
    batch = Dim("batch", min=1, max=1024)
    seq = Dim("seq", min=1, max=max(2, max_len - 1))
    shapes = {"input_ids": {0: batch, 1: seq}, "position_ids": {0: batch, 1: seq}}
    modes = CAPTURE_MODES if strict is None else (strict,)
    for attempt, mode in enumerate(modes):
        quiet = io.StringIO()
        try:
            with warnings.catch_warnings(), contextlib.redirect_stderr(quiet), _quiet_torch_logs(), torch.no_grad(), \
                    recipes.applied(model), _rope_within_context(model), \
                    experts_mode(experts):
                warnings.simplefilter("ignore")
                exported = torch.export.export(wrapper, (ids, pos), dynamic_shapes=shapes, strict=mode)
                exported.graph_module.graph.eliminate_dead_code()  # transformers' unused mask helpers
                exported.graph_module.recompile()
                if decompose or needs_decomposition(exported):
                    # An empty table keeps composite ops (linear, silu, ...) that map 1:1 onto ours.
                    return exported.run_decompositions({})
                return exported
        except ExportError:
            raise
        except Exception as exc:  # torch raises many types; report the construct that failed
            if attempt + 1 < len(modes):
                continue
            name = type(model).__name__
            raise ExportError(f"torch.export could not capture {name}: {_capture_failure(exc)}") from exc
    raise AssertionError("unreachable")


def needs_decomposition(exported: torch.export.ExportedProgram) -> bool:
    """Whether the graph torch.export captured must go through ``run_decompositions``.

    ``run_decompositions({})`` traces the whole model a second time, only to turn the
    captured graph into functional ATen ops (most of a capture's time: docs/speed.md).
    Most models' captured graphs are functional already, and every op in them has a
    lowering: then the lowered program is node for node the one the decomposed graph
    gives, and the second trace is skipped (``tests/exporter/test_capture.py`` checks it
    for three architectures; every architecture's parity test runs through this path).
    It is needed for a graph with an in-place op (OLMo's ``clamp_``, Mixtral's ``div_``)
    or an op the lowering does not know (a higher-order op, or one that decomposes into
    known ones).
    """
    from exporter.aten_ops import ATEN
    from exporter.complex_ops import COMPLEX, touches_complex
    from exporter.lower import target_name

    for node in exported.graph.nodes:
        if node.op != "call_function":
            continue
        target = node.target
        if target_name(target) not in (COMPLEX if touches_complex(node) else ATEN):
            return True
        if isinstance(target, torch._ops.OpOverload) and target._schema.is_mutable:
            return True
    return False


@contextlib.contextmanager
def _quiet_torch_logs():
    loggers = [logging.getLogger(n) for n in ("torch._dynamo", "torch._export", "torch.export", "torch.fx")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _capture_failure(exc: BaseException) -> str:
    """What stopped torch.export, in words a user can act on where we can tell."""
    line = _first_line(exc)
    if "Constraints violated (seq)" in line:
        # torch specialised the dynamic length: the forward loops over tokens (RWKV, xLSTM)
        return ("its forward fixes the sequence length (as a recurrent model's loop over the tokens does); a program "
                "needs it dynamic, with attention's KV cache as its only state")
    return line


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    for line in text.splitlines():
        line = line.strip()
        if line:
            return line[:300]
    return type(exc).__name__
