"""The on-disk form of a compiled program: ``program.json``, ``prefix.safetensors`` and,
for a LoRA program, ``adapter.safetensors``.

A program is a KV-cache prefix for one base model (the keys and values every attention
layer holds after reading the spec and any demonstrations), optionally with a LoRA
adapter the interpreter adds to the base model's linear layers at run time.
``program.json`` records what is needed to call it again without the spec's cost: the
prompt layout (how an input is joined to the prefix), the prefix token ids, the base
model's fingerprint, generation settings, the output constraint, and how the compiler
chose it (the candidates it measured on held-out examples). ``manifest.json`` holds every
file's sha256 (checked by ``read_artifact(verify=True)`` and ``paw inspect --verify``).

Reading checks every field and the tensors' header before MLX reads them, evaluates the
prefix (so any thread can use it), and ``check_against_base`` holds it to the base model
it is run on: fingerprint, layers, KV heads, head sizes, dtype and vocabulary.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import mlx.core as mx

from interp.atomic import atomic_directory
from interp.errors import ArtifactError, InputError, PawError
from interp.jsonfile import read_json_object
from interp.manifest import file_hashes, fingerprint, verify_manifest
from interp.program import MANIFEST_FILE, MAX_LAYERS, find_nan, read_manifest, read_safetensors_header
from interp.token_ids import check_token_ids
from paw_mlx.programs.adapter import ADAPTER_FILE, LoraAdapter, read_adapter, write_adapter
from paw_mlx.programs.copy_rule import CopyRule

FORMAT = "paw.kvprogram"
#: 2 added the adapter, demonstrations and the selection report; 3 the layout's leads and the copy
#: rule (written only by a program that has one, so that a paw reading version 2 never runs it without them)
VERSION = 3
READABLE_VERSIONS = (1, 2, 3)
#: the text a layout may put before an input or an output (``PromptLayout``)
LEADS = ("", " ")
ARTIFACT_FILE = "program.json"
PREFIX_FILE = "prefix.safetensors"
#: the files an artifact's fingerprint is made of
DEFINING_FILES = (ARTIFACT_FILE, PREFIX_FILE)
LAYOUT_KINDS = ("chat", "raw", "template")


@dataclass(frozen=True)
class PromptLayout:
    """How spec and input become token ids: prefix text (the spec's part), input, suffix.

    ``chat``: the base model's chat template with the spec as system message and the
    input as user message; ``prefix_text`` is everything before the user's words,
    ``suffix_text`` what follows them (end of turn, assistant header). ``raw``: plain
    text ``spec + prefix_text ... input ... suffix_text`` for models without a template.
    The prefix is tokenized alone and the input together with the suffix, so the ids of
    a call are always ``prefix_ids + encode(input_lead + input + suffix_text)``.

    ``input_lead`` and ``output_lead`` (a space, or nothing) go before every input and every
    output, the demonstrations' and a call's, so that their words tokenize as in running text
    (``compile.choose_leads``): a call's output is read without its lead (``output_text``).
    """

    kind: str
    prefix_text: str
    suffix_text: str
    input_lead: str = ""
    output_lead: str = ""

    def output_text(self, text: str) -> str:
        """A generated output as the caller sees it: without the output lead it starts with."""
        return text[len(self.output_lead):] if self.output_lead and text.startswith(self.output_lead) else text

    def output_pieces(self, pieces: Iterable[str]) -> Iterator[str]:
        """``output_text`` of a streamed output, piece by piece."""
        head = ""
        for piece in pieces:
            if head is None:
                yield piece
                continue
            head += piece
            if len(head) >= len(self.output_lead):
                head, rest = None, self.output_text(head)
                if rest:
                    yield rest
        if head:
            yield self.output_text(head)


@dataclass
class GenerationSettings:
    max_new_tokens: int = 64
    temperature: float = 0.0  # greedy: a program is a deterministic function by default
    strip: bool = False  # strip whitespace around outputs (as programasweights' runtime does for .paw bundles)


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
    #: the LoRA adapter applied to the base model's linear layers at run time, or None
    adapter: LoraAdapter | None = None
    #: the examples shown as demonstrations inside the prefix ({"input", "output"} each)
    demos: list[dict] = field(default_factory=list)
    #: the compiler's report: candidates, their held-out scores, which was kept and why
    selection: dict | None = None
    #: outputs are held to words of their input (``copy_rule.py``), or None
    copy_rule: CopyRule | None = None

    @property
    def prefix_length(self) -> int:
        return len(self.prefix_ids)

    def metadata(self) -> dict:
        newer = self.layout.input_lead or self.layout.output_lead or self.copy_rule is not None
        meta = {
            "format": FORMAT,
            "version": VERSION if newer else 2,
            "spec": self.spec,
            "base": {"fingerprint": self.base_fingerprint, "path_hint": self.base_hint},
            "layout": asdict(self.layout),
            "prefix_length": self.prefix_length,
            "prefix_ids": list(self.prefix_ids),
            "num_layers": len(self.prefix),
            "generation": asdict(self.generation),
            "tuning": self.tuning,
            "returns": self.returns,
            "adapter": self.adapter.summary() if self.adapter is not None else None,
            "demos": list(self.demos),
            "selection": self.selection,
        }
        if self.copy_rule is not None:
            meta["copy_rule"] = self.copy_rule.metadata()
        return meta


def write_artifact(artifact: ProgramArtifact, out_dir: str | Path, force: bool = False) -> Path:
    """Write atomically (``interp.atomic``): program.json, prefix.safetensors, manifest.json."""
    out = Path(out_dir)
    with atomic_directory(out, replace=force, error=ArtifactError) as tmp:
        tensors = {}
        for i, (k, v) in enumerate(artifact.prefix):
            tensors[f"layers.{i}.keys"] = k
            tensors[f"layers.{i}.values"] = v
        mx.save_safetensors(str(tmp / PREFIX_FILE), tensors, metadata={"format": FORMAT})
        if artifact.adapter is not None:
            write_adapter(artifact.adapter, tmp)
        text = json.dumps(artifact.metadata(), indent=1, ensure_ascii=False) + "\n"
        (tmp / ARTIFACT_FILE).write_text(text, encoding="utf-8")
        hashes = file_hashes(tmp, skip=MANIFEST_FILE)
        manifest = {"format": FORMAT, "files": hashes, "fingerprint": fingerprint(hashes, DEFINING_FILES)}
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    artifact.directory = out
    return out


def read_artifact_metadata(path: str | Path) -> tuple[Path, dict]:
    """(directory, program.json contents) of a program directory (or its program.json), checked.

    Reads no tensors: enough for the chat's view of a program (its spec and base).
    """
    path = Path(path).expanduser()
    directory = path.parent if path.name == ARTIFACT_FILE else path
    meta_path = directory / ARTIFACT_FILE
    if not meta_path.is_file():
        raise ArtifactError(f"{directory} is not a compiled program (no {ARTIFACT_FILE})")
    meta = read_json_object(meta_path, ArtifactError)
    if meta.get("format") != FORMAT:
        raise ArtifactError(f"{meta_path} is not a {FORMAT} file")
    version = meta.get("version")
    if isinstance(version, bool) or version not in READABLE_VERSIONS:
        raise ArtifactError(f"{meta_path} has version {version!r:.40}; this paw reads versions "
                            f"{', '.join(map(str, READABLE_VERSIONS))}")
    return directory, meta


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _fields(meta: dict, meta_path: Path) -> dict:
    """program.json's fields, each of the type it must have; ArtifactError naming the first that is not."""
    def need(ok: bool, what: str) -> None:
        if not ok:
            raise ArtifactError(f"{meta_path} is malformed: {what}")

    layout, base, generation = meta.get("layout"), meta.get("base"), meta.get("generation", {})
    need(isinstance(meta.get("spec"), str), "'spec' must be text")
    need(isinstance(layout, dict) and layout.get("kind") in LAYOUT_KINDS
         and isinstance(layout.get("prefix_text"), str) and isinstance(layout.get("suffix_text"), str),
         f"'layout' needs kind ({' or '.join(LAYOUT_KINDS)}), prefix_text and suffix_text")
    need(all(layout.get(lead, "") in LEADS for lead in ("input_lead", "output_lead")),
         "'layout.input_lead' and 'layout.output_lead' must be \"\" or \" \"")
    need(isinstance(meta.get("prefix_ids"), list), "'prefix_ids' must be a list of token ids")
    try:
        prefix_ids = check_token_ids(meta["prefix_ids"], None, what="'prefix_ids'")
    except InputError as exc:
        raise ArtifactError(f"{meta_path} is malformed: {exc}") from None
    # 0 for a base whose every layer is recurrent (no attention, no keys and values to keep)
    need(_is_int(meta.get("num_layers")) and 0 <= meta["num_layers"] <= MAX_LAYERS,
         "'num_layers' must be a whole number of layers")
    need(isinstance(base, dict), "'base' must be an object with the base model's fingerprint")
    made_for = base.get("fingerprint")
    if not isinstance(made_for, str) or not made_for:
        raise ArtifactError(f"{meta_path} does not say which base model it was made for (no base fingerprint); "
                            "recompile it with `paw compile`")
    need(isinstance(base.get("path_hint", ""), str), "'base.path_hint' must be text")
    need(isinstance(generation, dict) and set(generation) <= {"max_new_tokens", "temperature", "strip"},
         "'generation' holds only max_new_tokens, temperature and strip")
    need(isinstance(generation.get("strip", False), bool), "'generation.strip' must be true or false")
    max_new = generation.get("max_new_tokens", GenerationSettings.max_new_tokens)
    temperature = generation.get("temperature", GenerationSettings.temperature)
    need(_is_int(max_new) and max_new > 0, "'generation.max_new_tokens' must be a positive integer")
    need(isinstance(temperature, (int, float)) and not isinstance(temperature, bool)
         and 0 <= temperature < float("inf"),
         "'generation.temperature' must be a number >= 0")
    need(meta.get("tuning") is None or isinstance(meta["tuning"], dict), "'tuning' must be an object or null")
    need(meta.get("selection") is None or isinstance(meta["selection"], dict), "'selection' must be an object or null")
    need(meta.get("adapter") is None or isinstance(meta["adapter"], dict), "'adapter' must be an object or null")
    leads = layout.get("input_lead", ""), layout.get("output_lead", "")
    return {"spec": meta["spec"], "layout": PromptLayout(layout["kind"], layout["prefix_text"], layout["suffix_text"],
                                                         *leads),
            "prefix_ids": prefix_ids, "num_layers": meta["num_layers"], "base_fingerprint": made_for,
            "base_hint": base.get("path_hint", ""), "tuning": meta.get("tuning"),
            "generation": GenerationSettings(max_new_tokens=max_new, temperature=float(temperature),
                                             strip=generation.get("strip", False)),
            "returns": _read_returns(meta, meta_path), "demos": _read_demos(meta, need),
            "selection": meta.get("selection"), "has_adapter": bool(meta.get("adapter")),
            "copy_rule": (CopyRule.from_metadata(meta["copy_rule"], str(meta_path))
                          if meta.get("copy_rule") is not None else None)}


def _read_demos(meta: dict, need) -> list[dict]:
    demos = meta.get("demos") or []
    need(isinstance(demos, list) and all(isinstance(d, dict) and isinstance(d.get("input"), str)
                                         and isinstance(d.get("output"), str) for d in demos),
         "'demos' must be a list of {\"input\": text, \"output\": text}")
    return [{"input": d["input"], "output": d["output"]} for d in demos]


def _read_prefix(tensors_path: Path, num_layers: int, length: int) -> list[tuple[mx.array, mx.array]]:
    """The per-layer keys and values, shapes and dtypes checked, evaluated (usable on any thread)."""
    header = read_safetensors_header(tensors_path, ArtifactError)
    names = [f"layers.{i}.{part}" for i in range(num_layers) for part in ("keys", "values")]
    for name in names:
        meta = header.get(name)
        if meta is None:
            raise ArtifactError(f"{tensors_path} lacks {name} (the program has {num_layers} layers)")
        shape = meta["shape"]
        if len(shape) != 4 or shape[0] != 1 or shape[2] != length or 0 in shape:
            raise ArtifactError(f"{tensors_path}: {name} has shape {shape}; expected [1, kv_heads, {length}, head_dim]")
        if meta["dtype"] not in ("F32", "F16", "BF16"):
            raise ArtifactError(f"{tensors_path}: {name} is {meta['dtype']}, not a float tensor")
    try:
        tensors = mx.load(str(tensors_path))
    except Exception as exc:  # mlx raises plain RuntimeError/ValueError for bad files
        raise ArtifactError(f"cannot read {tensors_path}: {exc}") from exc
    prefix = [(tensors[f"layers.{i}.keys"], tensors[f"layers.{i}.values"]) for i in range(num_layers)]
    for i, (k, v) in enumerate(prefix):
        if k.shape[1] != v.shape[1]:
            raise ArtifactError(f"{tensors_path}: layer {i} has {k.shape[1]} key heads and {v.shape[1]} value heads")
    # mx.load's arrays are lazy and tied to this thread's stream: evaluated here, they can
    # be used from any thread (a pool of callers, a server's workers).
    mx.eval(prefix)
    corrupt = find_nan({name: tensors[name] for name in names})
    if corrupt is not None:
        raise ArtifactError(f"{tensors_path}: {corrupt} holds NaN values; the prefix is corrupted")
    return prefix


def read_artifact(path: str | Path, *, verify: bool = False) -> ProgramArtifact:
    """Load and check a program directory (or its program.json).

    ``verify`` first checks both files against their sha256 in manifest.json.
    """
    directory, meta = read_artifact_metadata(path)
    meta_path = directory / ARTIFACT_FILE
    fields = _fields(meta, meta_path)
    has_adapter = fields.pop("has_adapter")
    if verify:
        verify_manifest(directory, read_manifest(directory, ArtifactError), DEFINING_FILES,
                        (ADAPTER_FILE,) if has_adapter else (), error=ArtifactError)
    prefix = _read_prefix(directory / PREFIX_FILE, fields.pop("num_layers"), len(fields["prefix_ids"]))
    adapter = read_adapter(directory) if has_adapter else None
    return ProgramArtifact(prefix=prefix, directory=directory, adapter=adapter, **fields)


def check_against_base(artifact: ProgramArtifact, base) -> None:
    """ArtifactError unless ``artifact`` was made for ``base`` (a LoadedProgram) and fits it.

    The fingerprint must match, and the prefix must have the base's layers, KV heads,
    head sizes and cache dtype; its ids must be in the base's vocabulary.
    """
    where = f"program {artifact.directory}" if artifact.directory else "this program"
    if not artifact.base_fingerprint:
        raise ArtifactError(f"{where} does not say which base model it was made for; recompile it with `paw compile`")
    if not base.fingerprint:
        raise ArtifactError(
            f"the base model {base.path} has no fingerprint (no manifest.json): export it with `paw export`")
    if artifact.base_fingerprint != base.fingerprint:
        raise ArtifactError(
            f"{where} was compiled for base model {artifact.base_fingerprint} "
            f"({artifact.base_hint or 'unknown path'}), not for {base.fingerprint} ({base.path}); "
            "recompile it with `paw compile` for this base")
    layout = base.kv_layout()
    if len(artifact.prefix) != len(layout):
        raise ArtifactError(f"{where} has {len(artifact.prefix)} layers, the base model {len(layout)}")
    for i, ((k, v), (want_k, want_v, dtype)) in enumerate(zip(artifact.prefix, layout, strict=True)):
        got_k, got_v = (k.shape[1], k.shape[3]), (v.shape[1], v.shape[3])
        if (got_k, got_v) != (want_k, want_v):
            raise ArtifactError(f"{where}, layer {i}: keys/values of (heads, head size) {got_k}/{got_v}; "
                                f"the base model has {want_k}/{want_v}")
        if k.dtype != dtype or v.dtype != dtype:
            raise ArtifactError(f"{where}, layer {i}: the prefix is {k.dtype}, the base model's cache {dtype}")
    check_token_ids(artifact.prefix_ids, base.vocab_size, what=f"{where} prefix ids")
    if artifact.prefix_length >= base.context_length:
        raise ArtifactError(f"{where}'s prefix ({artifact.prefix_length} tokens) fills the base model's context "
                            f"of {base.context_length}")


def _read_returns(meta: dict, meta_path: Path) -> dict | None:
    from paw_mlx.constrain import normalize_returns

    returns = meta.get("returns")
    if returns is None:
        return None
    try:
        return normalize_returns(returns)
    except PawError as exc:
        raise ArtifactError(f"{meta_path}: 'returns': {exc}") from None
