"""The on-disk form of a compiled program: ``program.json`` plus ``prefix.safetensors``.

A program is a KV-cache prefix for one base model: the keys and values every
attention layer holds after reading the spec. ``program.json`` records what is needed
to call it again without the spec's cost: the prompt layout (how an input is joined to
the prefix), the prefix token ids, the base model's fingerprint, generation settings.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import mlx.core as mx

from interp.errors import ArtifactError, PawError

FORMAT = "paw.kvprogram"
VERSION = 1
PROGRAM_FILE = "program.json"
PREFIX_FILE = "prefix.safetensors"


@dataclass(frozen=True)
class PromptLayout:
    """How spec and input become token ids: prefix text (the spec's part), input, suffix.

    ``chat``: the base model's chat template with the spec as system message and the
    input as user message; ``prefix_text`` is everything before the user's words,
    ``suffix_text`` what follows them (end of turn, assistant header). ``raw``: plain
    text ``spec + prefix_text ... input ... suffix_text`` for models without a template.
    The prefix is tokenized alone and the input together with the suffix, so the ids of
    a call are always ``prefix_ids + encode(input + suffix_text)``.
    """

    kind: str
    prefix_text: str
    suffix_text: str


@dataclass
class GenerationSettings:
    max_new_tokens: int = 64
    temperature: float = 0.0  # greedy: a program is a deterministic function by default


@dataclass
class ProgramArtifact:
    """A compiled program in memory: the spec, its KV prefix, and how to call it."""

    spec: str
    base_fingerprint: str
    base_hint: str
    layout: PromptLayout
    prefix_ids: list[int]
    #: one (keys, values) pair per layer, each [1, kv_heads, prefix_length, head_dim]
    prefix: list[tuple[mx.array, mx.array]]
    generation: GenerationSettings = field(default_factory=GenerationSettings)
    #: how the prefix was tuned from examples (None for a spec-only compile)
    tuning: dict | None = None
    directory: Path | None = None
    #: the output constraint calls enforce (``paw_mlx.constrain.normalize_returns`` form), or None
    returns: dict | None = None

    @property
    def prefix_length(self) -> int:
        return len(self.prefix_ids)

    def metadata(self) -> dict:
        return {
            "format": FORMAT,
            "version": VERSION,
            "spec": self.spec,
            "base": {"fingerprint": self.base_fingerprint, "path_hint": self.base_hint},
            "layout": asdict(self.layout),
            "prefix_length": self.prefix_length,
            "prefix_ids": list(self.prefix_ids),
            "num_layers": len(self.prefix),
            "generation": asdict(self.generation),
            "tuning": self.tuning,
            "returns": self.returns,
        }


def write_artifact(artifact: ProgramArtifact, out_dir: str | Path, force: bool = False) -> Path:
    """Write atomically: into a temporary sibling directory, renamed into place at the end."""
    out = Path(out_dir)
    if out.exists() and not force:
        raise ArtifactError(f"{out} already exists (use --force to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        tensors = {}
        for i, (k, v) in enumerate(artifact.prefix):
            tensors[f"layers.{i}.keys"] = k
            tensors[f"layers.{i}.values"] = v
        mx.save_safetensors(str(tmp / PREFIX_FILE), tensors, metadata={"format": FORMAT})
        text = json.dumps(artifact.metadata(), indent=1, ensure_ascii=False) + "\n"
        (tmp / PROGRAM_FILE).write_text(text, encoding="utf-8")
        os.chmod(tmp, 0o755)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    artifact.directory = out
    return out


def read_artifact_metadata(path: str | Path) -> tuple[Path, dict]:
    """(directory, program.json contents) of a program directory (or its program.json), checked.

    Reads no tensors: enough for the chat's view of a program (its spec and base).
    """
    path = Path(path).expanduser()
    directory = path.parent if path.name == PROGRAM_FILE else path
    meta_path = directory / PROGRAM_FILE
    if not meta_path.is_file():
        raise ArtifactError(f"{directory} is not a compiled program (no {PROGRAM_FILE})")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ArtifactError(f"cannot read {meta_path}: {exc}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ArtifactError(f"{meta_path} is not a {FORMAT} file")
    if meta.get("version") != VERSION:
        raise ArtifactError(f"{meta_path} has version {meta.get('version')!r}; this paw reads version {VERSION}")
    return directory, meta


def read_artifact(path: str | Path) -> ProgramArtifact:
    """Load and check a program directory (or its program.json)."""
    directory, meta = read_artifact_metadata(path)
    meta_path = directory / PROGRAM_FILE
    try:
        layout = PromptLayout(**meta["layout"])
        prefix_ids = [int(t) for t in meta["prefix_ids"]]
        num_layers = int(meta["num_layers"])
        generation = GenerationSettings(**meta.get("generation", {}))
        base = meta["base"]
        spec = str(meta["spec"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ArtifactError(f"{meta_path} is malformed: {exc}") from None
    tensors_path = directory / PREFIX_FILE
    try:
        tensors = mx.load(str(tensors_path))
    except Exception as exc:
        raise ArtifactError(f"cannot read {tensors_path}: {exc}") from None
    prefix = []
    for i in range(num_layers):
        try:
            k, v = tensors[f"layers.{i}.keys"], tensors[f"layers.{i}.values"]
        except KeyError:
            raise ArtifactError(f"{tensors_path} lacks layer {i} of {num_layers}") from None
        if k.ndim != 4 or v.ndim != 4 or k.shape[2] != len(prefix_ids) or v.shape[2] != len(prefix_ids):
            raise ArtifactError(f"{tensors_path}: layer {i} keys/values do not cover the {len(prefix_ids)} prefix tokens")
        prefix.append((k, v))
    return ProgramArtifact(spec=spec, base_fingerprint=str(base.get("fingerprint", "")),
                           base_hint=str(base.get("path_hint", "")), layout=layout, prefix_ids=prefix_ids,
                           prefix=prefix, generation=generation, tuning=meta.get("tuning"), directory=directory,
                           returns=_read_returns(meta, meta_path))


def _read_returns(meta: dict, meta_path: Path) -> dict | None:
    from paw_mlx.constrain import normalize_returns

    returns = meta.get("returns")
    if returns is None:
        return None
    try:
        return normalize_returns(returns)
    except PawError as exc:
        raise ArtifactError(f"{meta_path}: 'returns': {exc}") from None
