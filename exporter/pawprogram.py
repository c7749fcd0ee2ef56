"""Convert an artifact of the original programasweights package into a paw program.

We have no real original artifact, so this reads the layout we expect it to have:

    SRC/program.json   {"spec": "..."} (or "prompt"), optionally "prefix_ids": [...]
                       (the token ids the prefix was computed from), "max_new_tokens": N,
                       and "prefix_file" naming the tensor file (default prefix.pt)
    SRC/prefix.pt      the KV prefix, saved with torch.save, as either
                       - a list/tuple with one (key, value) pair per layer (the legacy
                         Hugging Face ``past_key_values`` form), or a dict holding such a
                         list under "past_key_values", or
                       - a flat dict {"layers.N.keys": tensor, "layers.N.values": tensor}
                       each tensor [1, kv_heads, prefix_length, head_dim] or without the
                       leading 1.

The tensor file is read with ``torch.load(weights_only=True)``: tensors and plain
containers only, never arbitrary pickled objects. Without "prefix_ids" the prefix is
taken to be the spec laid out in the base model's chat template (paw's own layout),
and its length must match the tensors'.
"""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import numpy as np
import torch

from interp.errors import ArtifactError
from interp.jsonfile import read_json_object
from interp.token_ids import check_token_ids
from paw_mlx.programs.artifact import GenerationSettings, ProgramArtifact, write_artifact
from paw_mlx.programs.compile import compute_prefix, layout_prefix_ids, prompt_layout
from paw_mlx.programs.interpreter import interpreter, resolve_base


def _pairs(obj, where: str) -> list[tuple]:
    if isinstance(obj, dict) and "past_key_values" in obj:
        obj = obj["past_key_values"]
    if isinstance(obj, list | tuple):
        pairs = [tuple(p) for p in obj]
        if not pairs or any(len(p) != 2 for p in pairs):
            raise ArtifactError(f"{where}: expected one (key, value) pair per layer")
        return pairs
    if isinstance(obj, dict):
        count = len([k for k in obj if str(k).startswith("layers.") and str(k).endswith(".keys")])
        try:
            return [(obj[f"layers.{i}.keys"], obj[f"layers.{i}.values"]) for i in range(count)]
        except KeyError as exc:
            raise ArtifactError(f"{where}: missing {exc.args[0]}") from None
    raise ArtifactError(f"{where}: unrecognised prefix layout ({type(obj).__name__})")


def _to_mx(tensor, where: str, dtype) -> mx.array:
    if not isinstance(tensor, torch.Tensor):
        raise ArtifactError(f"{where}: expected tensors, found {type(tensor).__name__}")
    if tensor.ndim == 3:
        tensor = tensor.unsqueeze(0)
    if tensor.ndim != 4 or tensor.shape[0] != 1:
        raise ArtifactError(f"{where}: expected [1, heads, length, head_dim] tensors, found {list(tensor.shape)}")
    return mx.array(np.ascontiguousarray(tensor.detach().to(torch.float32).numpy())).astype(dtype)


def _prefix_file(src: Path, name, meta_path: Path) -> Path:
    """The tensor file named by program.json: a file directly inside ``src``, never elsewhere."""
    if not isinstance(name, str) or not name or Path(name).name != name or name in (".", ".."):
        raise ArtifactError(f"{meta_path}: prefix_file must be a file name inside {src}, not {name!r:.80}")
    path = src / name
    if not path.is_file():
        raise ArtifactError(f"{src} has no {name}")
    if not path.resolve().is_relative_to(src.resolve()):
        raise ArtifactError(f"{meta_path}: prefix_file {name!r} leads outside {src}")
    return path


def convert_program(src: str | Path, out: str | Path, base: str | Path = "smollm2", force: bool = False) -> ProgramArtifact:
    """Read an original artifact, check it against ``base``, write it in paw's format."""
    src = Path(src)
    meta_path = src / "program.json"
    if not meta_path.is_file():
        raise ArtifactError(f"{src} has no program.json")
    meta = read_json_object(meta_path, ArtifactError)
    spec = meta.get("spec") or meta.get("prompt")
    if not isinstance(spec, str) or not spec.strip():
        raise ArtifactError(f'{meta_path} has no "spec" (or "prompt") text')
    tensor_path = _prefix_file(src, meta.get("prefix_file", "prefix.pt"), meta_path)
    max_new_tokens = meta.get("max_new_tokens", 64)
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
        raise ArtifactError(f"{meta_path}: max_new_tokens must be a positive integer")
    if "prefix_ids" in meta and not isinstance(meta["prefix_ids"], list):
        raise ArtifactError(f"{meta_path}: prefix_ids must be a list of token ids")
    try:
        loaded = torch.load(tensor_path, map_location="cpu", weights_only=True)
    except Exception as exc:  # weights_only refuses anything but tensors and plain containers
        raise ArtifactError(f"cannot read {tensor_path} as tensors: {str(exc).splitlines()[0]}") from None
    base_path = resolve_base(base)
    prog = interpreter(base_path)
    layout = prompt_layout(prog.tokenizer, spec.strip())
    if "prefix_ids" in meta:
        ids = check_token_ids(meta["prefix_ids"], prog.vocab_size, what=f"{meta_path} prefix_ids")
    else:
        ids = layout_prefix_ids(prog.tokenizer, layout)
    probe = compute_prefix(prog, ids[:1])  # the base's per-layer key/value shapes and dtype
    pairs = _pairs(loaded, str(tensor_path))
    if len(pairs) != len(probe):
        raise ArtifactError(f"{tensor_path} has {len(pairs)} layers; the base model has {len(probe)}")
    prefix = []
    for i, ((k, v), (pk, pv)) in enumerate(zip(pairs, probe, strict=True)):
        k, v = _to_mx(k, f"{tensor_path} layer {i} keys", pk.dtype), _to_mx(v, f"{tensor_path} layer {i} values", pv.dtype)
        for got, want, what in ((k, pk, "keys"), (v, pv, "values")):
            if got.shape[1] != want.shape[1] or got.shape[3] != want.shape[3]:
                raise ArtifactError(f"{tensor_path} layer {i} {what}: heads x head_dim {got.shape[1]}x{got.shape[3]}, "
                                    f"the base model has {want.shape[1]}x{want.shape[3]}")
            if got.shape[2] != len(ids):
                raise ArtifactError(f"{tensor_path} layer {i} {what} cover {got.shape[2]} tokens; the prefix has "
                                    f"{len(ids)} (give prefix_ids in program.json)")
        prefix.append((k, v))
    artifact = ProgramArtifact(spec=spec.strip(), base_fingerprint=prog.fingerprint, base_hint=str(base_path),
                               layout=layout, prefix_ids=ids, prefix=prefix,
                               generation=GenerationSettings(max_new_tokens=max_new_tokens),
                               tuning={"method": "converted", "source": str(src)})
    write_artifact(artifact, out, force=force)
    return artifact
