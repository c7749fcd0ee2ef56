"""Export a transformers causal LM into a program directory: capture, lower, write."""

from __future__ import annotations

import contextlib
import operator
import platform
from collections.abc import Callable
from pathlib import Path

import torch

from exporter.capture import capture, context_length
from exporter.consts_writer import DEFAULT_SHARD_BYTES
from exporter.experts import EXPERT_MODES
from exporter.lower import PROGRAM_INPUTS, eliminate_dead_code, lower
from exporter.sources import (
    Source,
    check_gguf,
    load_source,
    load_source_streaming,
    load_tokenizer,
    parse_gguf_once,
    resolve_source,
    text_model_of,
)
from exporter.ternary import WEIGHT_MODES, ternarize_program, ternary_capture
from exporter.tokenizer_check import check_tokenizer, tokenizer_saver
from exporter.writer import atomic_directory, write_manifest, write_program
from interp import schema
from interp.atomic import check_not_reading, check_writable
from interp.errors import ExportError, SourceError
from interp.program import RECURRENT_STATES

EXPORTER_VERSION = "paw-exporter 0.1.0"
DTYPES = ("float32", "float16", "bfloat16")
KEEP = "keep"  # --quantize keep: a GGUF source's blocks as they are

Progress = Callable[[str], None]


def _eos_ids(model, tokenizer) -> list[int]:
    """The ids that end generation, from the generation config, the config and the tokenizer;
    ExportError for one no program may hold (negative, past 2**31: ``interp/program.py`` refuses
    such a program at load), so the export stops before the capture instead."""
    found: list[tuple[str, object]] = []
    configs = (("generation config's", getattr(model, "generation_config", None)), ("config's", model.config))
    for what, source in configs:
        value = getattr(source, "eos_token_id", None) if source is not None else None
        values = value if isinstance(value, (list, tuple)) else [] if value is None else [value]
        found += [(f"the {what} eos_token_id", v) for v in values]
    if tokenizer is not None and getattr(tokenizer, "eos_token_id", None) is not None:
        found.append(("the tokenizer's eos token id", tokenizer.eos_token_id))
    ids = set()
    for what, value in found:
        try:
            token = operator.index(value)
        except TypeError:
            token = -1
        if isinstance(value, bool) or not 0 <= token <= schema.INT32_MAX:
            raise ExportError(f"{what} is {value!r:.40}, which is no token id (an integer in [0, 2**31))")
        ids.add(token)
    return sorted(ids)


def build_spec(model, tokenizer, low, outputs: list[str], dtype: str, source_info: dict) -> dict:
    """prog.json contents from a lowering."""
    if len(outputs) != 1:
        raise ExportError(f"expected one graph output (logits), got {len(outputs)}")
    # Name the output value "logits".
    for node in low.nodes:
        if outputs[0] in node["outputs"]:
            node["outputs"] = ["logits" if o == outputs[0] else o for o in node["outputs"]]
    layers = sorted({n["attrs"]["layer"] for n in low.nodes if n["op"] in schema.KV_CACHE_OPS})
    recurrent_ops = {op for _, op in RECURRENT_STATES}
    if not layers and not any(n["op"] in recurrent_ops for n in low.nodes):
        # attention written by hand and masked by the model itself: right on a whole sequence,
        # wrong through a cache, which such a program would never fill (a purely recurrent
        # model, Mamba2, has no attention to cache)
        raise ExportError(f"cannot export: {type(model).__name__} computes attention outside transformers' attention "
                          "interface (no paw::attention in its graph); paw has no recipe for it (exporter/recipes.py)")
    if layers != list(range(len(layers))):
        raise ExportError(f"attention layers are not numbered 0..n-1: {layers}")
    state = {"kv_cache": {"layers": len(layers)}}
    slots = len(layers)
    for kind, op in RECURRENT_STATES:  # the cache list holds the KV caches, then each kind's recurrent states
        stateful = [n for n in low.nodes if n["op"] == op]
        for node in stateful:
            node["attrs"]["layer"] += slots
        if stateful:
            state[kind] = {"layers": len(stateful)}
        slots += len(stateful)
    config = model.config
    vocab = int(getattr(config, "vocab_size", 0) or 0)
    return {
        "format": schema.FORMAT_NAME,
        "version": schema.FORMAT_VERSION,
        "model": {
            "architecture": (getattr(config, "architectures", None) or [type(model).__name__])[0],
            "model_type": getattr(config, "model_type", ""),
            "dtype": dtype,
            "vocab_size": vocab,
            "context_length": context_length(config),
            "eos_token_ids": _eos_ids(model, tokenizer),
            "bos_token_id": getattr(tokenizer, "bos_token_id", None) if tokenizer is not None else None,
            "source": source_info,
        },
        "inputs": [{"name": name, "dtype": "int32", "shape": ["batch", "seq"]} for name in PROGRAM_INPUTS],
        "outputs": [{"name": "logits", "dtype": dtype, "shape": ["batch", "seq", vocab]}],
        "state": state,
        "consts": {
            name: {"dtype": _dtype_name(t), "shape": list(t.shape)} for name, t in sorted(low.consts.items())
        },
        "nodes": low.nodes,
    }


def _dtype_name(t: torch.Tensor) -> str:
    from exporter.lower import dtype_name

    return dtype_name(t.dtype)


def export_model(model, tokenizer, out_dir: str | Path, *, dtype: str | None = None, source_info: dict | None = None,
                 force: bool = False, progress: Progress | None = None, weights: str = "float",
                 fuse: bool = True, quantize: int | str = 0, group_size: int = 64, checkpoint=None,
                 max_shard_bytes: int = DEFAULT_SHARD_BYTES, experts: str = "sparse") -> Path:
    """Export a transformers model (and its tokenizer) to ``out_dir``.

    ``weights``: "float", or "ternary" / "ternary-base3" to pack linear layers as ternary
    (exporter/ternary.py); BitNet checkpoints are packed exactly in every mode.
    ``fuse`` runs the fusion passes (exporter/fuse.py: RMSNorm, RoPE -> mx.fast ops);
    ``quantize`` > 0 stores linear and embedding weights affine-quantized to that many
    bits in groups of ``group_size`` (exporter/quantize.py); "keep" stores a GGUF source's
    Q4_0/Q4_1/Q5_0/Q5_1/Q8_0/Q4_K/Q5_K weights as the same blocks in MLX's layout
    (exporter/gguf_blocks.py).
    ``checkpoint`` (``exporter.checkpoint.CheckpointWeights``): the model's parameters are
    on the meta device and every weight is read from the checkpoint as it is written.
    Consts above ``max_shard_bytes`` are written as shards (0: never). ``experts``: how
    mixture-of-experts blocks run, "sparse" (only the routed experts' weights) or "dense".
    """
    say = progress or (lambda msg: None)
    check_options(weights=weights, quantize=quantize, group_size=group_size, max_shard_bytes=max_shard_bytes,
                  experts=experts)
    if quantize == KEEP and checkpoint is None:
        raise ExportError("--quantize keep stores a GGUF file's blocks as they are: it needs a .gguf source, "
                          "read as a stream (not --no-stream)")
    first = next(model.parameters(), None)
    dtype = dtype or (str(first.dtype).removeprefix("torch.") if first is not None else "float32")
    if dtype not in DTYPES:
        raise ExportError(f"unsupported dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    model = model.to(getattr(torch, dtype))
    _eos_ids(model, tokenizer)  # refused before the capture, not when the program is loaded
    say("capturing the graph with torch.export")
    placeholders = checkpoint.placeholders(model) if checkpoint is not None else contextlib.nullcontext()
    with ternary_capture(model, weights) as ternary_plan, placeholders:
        exported = capture(model, experts=experts)
    say("lowering aten ops to program ops")
    low, outputs = lower(exported, const_source=checkpoint.const_source if checkpoint is not None else None)
    del exported
    eliminate_dead_code(low, outputs)
    if quantize == KEEP:
        _keep_blocks(low, checkpoint, say)
    # after the GGUF blocks are kept: a folded const keeps its name but not the file's layout
    _fold_layouts(low, outputs, say)
    packed = ternarize_program(low, outputs, ternary_plan) if ternary_plan.active else 0
    if packed:
        say(f"packed {packed} linear weights as ternary ({ternary_plan.packing})")
    if fuse:
        from exporter.fuse import fuse as run_fusion

        fused = run_fusion(low)
        say("fused " + ", ".join(f"{count} {name}" for name, count in fused.items()))
        eliminate_dead_code(low, outputs)
    if quantize and quantize != KEEP:
        from exporter.quantize import quantize_weights

        count = quantize_weights(low, quantize, group_size)
        say(f"quantized {count} weights to {quantize} bits (groups of {group_size})")
    spec = build_spec(model, tokenizer, low, outputs, dtype, source_info or {})
    if packed:
        spec["model"]["ternary"] = {"packing": ternary_plan.packing, "linear_weights": packed}
    out = Path(out_dir)
    say(f"writing {out}")
    with atomic_directory(out, force=force) as tmp:
        write_program(tmp, spec, low.consts, tokenizer_saver(tokenizer), max_shard_bytes,
                      _byte_progress(progress, f"writing {out}"))
        write_manifest(tmp, {
            "exporter": EXPORTER_VERSION,
            "source": source_info or {},
            "versions": {"torch": torch.__version__, "transformers": _version("transformers"),
                         "python": platform.python_version()},
        })
    return out


def export_source(src: str, out_dir: str | Path, *, dtype: str = "float32", force: bool = False,
                  progress: Progress | None = None, weights: str = "float", stream: bool = True,
                  **options) -> Path:
    """Export a model named by alias, GGUF path, folder or hub id (options as ``export_model``).

    ``stream`` reads each weight from the checkpoint as it is written (``exporter.checkpoint``),
    so the export's memory does not grow with the model; sources that cannot stream, and
    ``stream=False``, load the whole model first.
    """
    say = progress or (lambda msg: None)
    if dtype not in DTYPES:
        raise ExportError(f"unsupported dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    check_options(weights=weights, **options)
    if options.get("quantize") == KEEP and not stream:
        raise ExportError("--quantize keep stores a GGUF file's blocks as they are: it needs a .gguf source, "
                          "read as a stream (not --no-stream)")
    out = Path(out_dir)
    if out.exists() and not force and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"{out} already exists; pass --force to replace it")
    check_writable(out, ExportError, folder=True)
    source: Source = resolve_source(src, progress=progress is not None)
    if source.kind != "hub":
        check_not_reading(out, [Path(source.location, source.gguf_file or "")], ExportError)
    if options.get("quantize") == KEEP and source.kind != "gguf":
        raise ExportError(f"--quantize keep stores a GGUF file's blocks as they are; {src} is not a .gguf file")
    name = source.info.get("id") or source.info.get("file") or source.location
    info = dict(source.info)
    text_model = text_model_of(source)
    if text_model is not None:
        say(text_model.note())
        info["text_model_of"] = text_model.composite_type
    with parse_gguf_once():  # a GGUF file is parsed once for the tokenizer, the config and the weights
        check_gguf(source)
        say(f"reading the tokenizer of {name} and checking its chat template")
        try:
            tokenizer = load_tokenizer(source)
        except SourceError:  # none, or unreadable: the loader reports it where it always has, after the config
            tokenizer = None
        else:
            check_tokenizer(tokenizer, source, say)  # a chat template run time would refuse, before the weights
        model, tokenizer, checkpoint = _load_model(source, name, dtype, text_model, tokenizer, stream, say)
    if checkpoint is not None and not options.get("quantize") and weights == "float":
        _hint_keep(checkpoint, say)
    revision = getattr(model.config, "_commit_hash", None)
    if revision:
        info["revision"] = revision
    return export_model(model, tokenizer, out, dtype=dtype, source_info=info, force=force, progress=progress,
                        weights=weights, checkpoint=checkpoint, **options)


def _load_model(source: Source, name: str, dtype: str, text_model, tokenizer, stream: bool, say: Progress):
    """(model, tokenizer, CheckpointWeights or None): streamed from the checkpoint when ``stream`` and the
    source allows it, else loaded whole."""
    if stream:
        from exporter.checkpoint import NotStreamable

        say(f"reading {name} (weights stay on disk until written)")
        try:
            return load_source_streaming(source, dtype, text_model, tokenizer)
        except NotStreamable as why:
            say(f"loading {name} whole: {why}")
    else:
        say(f"loading {name}")
    return (*load_source(source, dtype, text_model, tokenizer), None)


def check_options(*, weights: str = "float", quantize: int | str = 0, group_size: int = 64,
                  max_shard_bytes: int = DEFAULT_SHARD_BYTES, experts: str = "sparse", **_) -> None:
    """Refuse an impossible combination of export options before any model is loaded."""
    from exporter.quantize import BITS

    if weights not in WEIGHT_MODES:
        raise ExportError(f"unknown weights mode {weights!r}; choose one of {', '.join(WEIGHT_MODES)}")
    if quantize != KEEP and quantize not in (0, *BITS):
        raise ExportError(f"--quantize takes {', '.join(map(str, BITS))} bits, 0 or keep, not {quantize!r}")
    if quantize and weights != "float":
        raise ExportError("--quantize and --weights ternary are exclusive: choose one weight format")
    if quantize not in (0, KEEP) and group_size not in (32, 64, 128):
        raise ExportError(f"--group-size must be 32, 64 or 128, not {group_size}")
    if max_shard_bytes < 0:
        raise ExportError("--max-shard-size must be 0 (never shard) or a positive size")
    if experts not in EXPERT_MODES:
        raise ExportError(f"unknown experts mode {experts!r}; choose one of {', '.join(EXPERT_MODES)}")


def _keep_blocks(low, checkpoint, say: Progress) -> None:
    from exporter.gguf_blocks import NAMES, keep_gguf_blocks

    kept, others = keep_gguf_blocks(low, checkpoint)
    left = ", ".join(f"{count} {kind}" for kind, count in sorted(others.items()))
    if not kept:
        kinds = list(NAMES.values())
        raise ExportError(f"--quantize keep found no linear or embedding weight stored as {', '.join(kinds[:-1])} "
                          f"or {kinds[-1]}"
                          + (f" (the source has {left})" if left else "")
                          + "; use --quantize 4 or 8 to quantize the weights instead")
    say(f"kept {kept} weights as their GGUF blocks" + (f"; dequantized {left}" if left else ""))


def _fold_layouts(low, outputs: list[str], say: Progress) -> None:
    """Fold reshapes and transposes of stored weights into them (exporter/fold.py); note the ones left."""
    from exporter.fold import fold_layouts, unfolded_weights

    folded = fold_layouts(low, outputs)
    if folded:
        say(f"folded {folded} layout ops into the stored weights")
    left = unfolded_weights(low)
    if left:
        what = (f"{left[0]} and {len(left) - 1} more weights reach their ops", "them") if len(left) > 1 \
            else (f"{left[0]} reaches its op", "it")
        say(f"note: {what[0]} through layout ops whose weight has other readers; left unfolded, "
            f"so --quantize and ternary packing leave {what[1]} in float")


def _hint_keep(checkpoint, say: Progress) -> None:
    """Say so when a GGUF source holds blocks ``--quantize keep`` could store as they are."""
    from exporter.gguf_blocks import NAMES

    kinds = {kind: count for kind, count in checkpoint.gguf_types().items() if kind in NAMES.values()}
    if kinds:
        held = ", ".join(f"{count} {kind}" for kind, count in sorted(kinds.items()))
        say(f"dequantizing the source's {held} tensors (--quantize keep would store them as they are)")


def _byte_progress(progress: Progress | None, message: str) -> Callable[[int, int], None] | None:
    """Byte counts of the consts written, shown on the current step when the reporter can update it."""
    update = getattr(progress, "update", None)
    if update is None:
        return None

    def report(done: int, total: int) -> None:
        update(f"{message}: {done / 1e9:.2f} of {total / 1e9:.2f} GB")

    return report


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "unknown"
