"""``.paw`` bundles of the programasweights package (0.4.x), read and written without it.

A bundle is a zip holding exactly:

* ``meta.json``: ``program_id`` (16-64 lowercase hex digits), ``interpreter`` (the base
  model, e.g. ``Qwen/Qwen3-0.6B`` or ``gpt2``), optionally ``spec`` and runtime fields;
* ``adapter.gguf``: a llama.cpp LoRA (``blk.N.<tensor>.weight.lora_a`` [rank, in] and
  ``.lora_b`` [out, rank], any of F32/F16/BF16/Q8_0/Q4_0..., ``adapter.lora.alpha``;
  the update is ``alpha / rank * b @ a``);
* ``prompt_template.txt``: the rendered prompt with ``{INPUT_PLACEHOLDER}`` exactly once;
* optionally ``pseudo_program.txt``.

Its runtime (llama.cpp) applies the adapter to every token, tokenizes the text before the
placeholder alone (no BOS, special tokens parsed) and caches it as the prefix, appends
``input + text after the placeholder`` per call, decodes greedily to EOS and strips the
output. paw does the same: the prefix is computed through the adapted model once, the
adapter is added to the base program at load time (``interp/lora.py``), llama.cpp tensor
names map to the base program's modules through gguf's own name tables.

Archives are untrusted input: members must be the known names, regular files, within
size limits, with no ``..``, absolute or drive paths; anything else is refused before a
byte is written.
"""

from __future__ import annotations

import hashlib
import io
import json
import lzma
import re
import stat
import tempfile
import time
import zipfile
import zlib
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath

import numpy as np

from interp.atomic import atomic_write_bytes, check_not_reading, check_writable
from interp.errors import ArtifactError
from interp.lora import check_adapter, linear_sites
from interp.paths import require_file
from paw_mlx.programs.adapter import LoraAdapter
from paw_mlx.programs.artifact import GenerationSettings, ProgramArtifact, PromptLayout
from paw_mlx.runtime import LoadedProgram

PLACEHOLDER = "{INPUT_PLACEHOLDER}"
REQUIRED = ("meta.json", "adapter.gguf", "prompt_template.txt")
OPTIONAL = ("pseudo_program.txt",)
#: the largest archive, and the largest expansion of each member (programasweights' own
#: limits are 256 MiB per archive and 512 MiB expanded)
MAX_ARCHIVE_BYTES = 256 << 20
MAX_MEMBER_BYTES = {"meta.json": 1 << 20, "prompt_template.txt": 4 << 20, "pseudo_program.txt": 4 << 20,
                    "adapter.gguf": 256 << 20}
MAX_MEMBERS = 16
_PROGRAM_ID = re.compile(r"[0-9a-f]{16,64}")
#: what a bundle's interpreter name means as a transformers model_type
INTERPRETERS = {"Qwen/Qwen3-0.6B": "qwen3", "gpt2": "gpt2", "openai-community/gpt2": "gpt2"}
#: transformers model_type -> llama.cpp architecture, where the names differ
GGUF_ARCHS = {"mistral": "llama", "mixtral": "llama", "gemma3_text": "gemma3", "gpt_neox": "gptneox",
              "qwen2_moe": "qwen2moe", "phi": "phi2"}
#: a bundle's outputs: greedy, up to this many tokens unless the caller says otherwise
BUNDLE_MAX_NEW_TOKENS = 512


@dataclass
class Bundle:
    """The checked members of a ``.paw`` archive."""

    meta: dict
    template: str
    adapter: bytes
    pseudo_program: str | None


# ----------------------------------------------------------------------------- reading


#: what reading a damaged member raises: corrupt (BadZipFile, EOFError, zlib's and lzma's errors),
#: encrypted (RuntimeError), or needing a zip version or method zipfile lacks (NotImplementedError)
_UNREADABLE_ZIP = (OSError, zipfile.BadZipFile, RuntimeError, EOFError, NotImplementedError, zlib.error,
                      lzma.LZMAError, ValueError)


def _check_member(info: zipfile.ZipInfo, path: Path) -> str:
    name = info.filename
    parts = PurePosixPath(name).parts
    if (not name or "\\" in name or name.startswith("/") or (parts and ":" in parts[0])
            or any(p in ("", ".", "..") for p in parts)):
        raise ArtifactError(f"{path}: unsafe member path {name!r} in the .paw archive")
    mode = info.external_attr >> 16
    if stat.S_ISLNK(mode) or info.is_dir() or (stat.S_IFMT(mode) and not stat.S_ISREG(mode)):
        raise ArtifactError(f"{path}: member {name!r} is not a regular file")
    if name not in REQUIRED + OPTIONAL:
        raise ArtifactError(f"{path}: unknown member {name!r} (a .paw bundle holds only "
                            f"{', '.join(REQUIRED + OPTIONAL)})")
    if info.file_size > MAX_MEMBER_BYTES[name]:
        raise ArtifactError(f"{path}: member {name} expands to {info.file_size} bytes "
                            f"(limit {MAX_MEMBER_BYTES[name]})")
    return name


def read_bundle(path: str | Path) -> Bundle:
    """The members of a ``.paw`` file, checked (see the module docstring); reads, never extracts."""
    path = Path(path).expanduser()
    require_file(path, ".paw file", ArtifactError)
    if path.stat().st_size > MAX_ARCHIVE_BYTES:
        raise ArtifactError(f"{path} is larger than {MAX_ARCHIVE_BYTES >> 20} MiB")
    with path.open("rb") as handle:
        if handle.read(4).startswith(b"PAW"):
            raise ArtifactError(f"{path} is a legacy binary .paw (format 2); only GGUF zip bundles are supported")
    try:
        archive = zipfile.ZipFile(path)
    except _UNREADABLE_ZIP as exc:  # a damaged central directory raises as a damaged member does
        raise ArtifactError(f"{path} is not a .paw bundle (not a zip archive: {exc})") from exc
    with archive:
        infos = archive.infolist()
        if len(infos) > MAX_MEMBERS:
            raise ArtifactError(f"{path}: {len(infos)} members; a .paw bundle has at most {len(REQUIRED + OPTIONAL)}")
        data: dict[str, bytes] = {}
        for info in infos:
            name = _check_member(info, path)
            if name in data:
                raise ArtifactError(f"{path}: member {name} appears twice")
            try:
                with archive.open(info) as member:
                    content = member.read(MAX_MEMBER_BYTES[name] + 1)
            except _UNREADABLE_ZIP as exc:
                raise ArtifactError(f"{path}: cannot read member {name}: {exc}") from exc
            if len(content) > MAX_MEMBER_BYTES[name]:
                raise ArtifactError(f"{path}: member {name} is larger than its header says")
            data[name] = content
    missing = [n for n in REQUIRED if n not in data]
    if missing:
        raise ArtifactError(f"{path}: missing member {', '.join(missing)}")
    try:
        meta = json.loads(data["meta.json"].decode("utf-8"))
        template = data["prompt_template.txt"].decode("utf-8")
        pseudo = data["pseudo_program.txt"].decode("utf-8") if "pseudo_program.txt" in data else None
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:  # RecursionError: nested too deeply
        raise ArtifactError(f"{path}: unreadable meta.json or template: {exc}") from None
    if not isinstance(meta, dict):
        raise ArtifactError(f"{path}: meta.json is not a JSON object")
    if not isinstance(meta.get("program_id"), str) or not _PROGRAM_ID.fullmatch(meta["program_id"]):
        raise ArtifactError(f"{path}: meta.json needs a program_id of 16-64 lowercase hex digits")
    if not isinstance(meta.get("interpreter"), str) or not meta["interpreter"]:
        raise ArtifactError(f"{path}: meta.json does not name its interpreter (base model)")
    runtime = meta.get("runtime")
    if meta.get("runtime_manifest_version") == 2 or (isinstance(runtime, dict) and "input" in runtime):
        raise ArtifactError(f"{path}: image (vision) programs are not supported")
    if template.count(PLACEHOLDER) != 1:
        raise ArtifactError(f"{path}: prompt_template.txt must hold {PLACEHOLDER} exactly once")
    if not data["adapter.gguf"].startswith(b"GGUF"):
        raise ArtifactError(f"{path}: adapter.gguf is not a GGUF file")
    return Bundle(meta, template, data["adapter.gguf"], pseudo)


def gguf_arch(model_type: str) -> str:
    """The llama.cpp architecture name of a transformers model_type."""
    import gguf

    arch = GGUF_ARCHS.get(model_type, model_type)
    if arch not in gguf.MODEL_ARCH_NAMES.values():
        raise ArtifactError(f"llama.cpp has no tensor names for {model_type!r} models")
    return arch


def gguf_module_names(prog: LoadedProgram) -> dict[str, str]:
    """llama.cpp tensor names (``blk.0.attn_q``) of the base program's modules -> module names."""
    import gguf

    arch = gguf_arch(prog.program.model_info.get("model_type", ""))
    kind = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    table = gguf.get_tensor_name_map(kind, max(1, prog.model.num_layers))
    names = {}
    for module in linear_sites(prog.program):
        found = table.get_name(module)
        if found is not None:
            names[found] = module
    return names


def read_gguf_lora(data: bytes, where: str) -> tuple[str | None, float, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """(architecture, alpha, {llama.cpp module name: (a [rank, in], b [out, rank])}) of a GGUF LoRA."""
    import gguf

    with tempfile.TemporaryDirectory(prefix="paw-gguf-") as tmp:
        file = Path(tmp) / "adapter.gguf"
        file.write_bytes(data)
        try:
            reader = gguf.GGUFReader(file)
        except (ValueError, IndexError, KeyError, OSError, TypeError) as exc:  # gguf reports malformed files so
            raise ArtifactError(f"{where}: malformed GGUF adapter: {exc}") from exc
        fields = {name: _field_value(field) for name, field in reader.fields.items()}
        halves: dict[str, dict[str, np.ndarray]] = {}
        for tensor in reader.tensors:
            found = re.fullmatch(r"(.+)\.weight\.lora_([ab])", tensor.name)
            if found is None:
                raise ArtifactError(f"{where}: adapter tensor {tensor.name!r} is not a LoRA lora_a/lora_b")
            try:
                values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
            except NotImplementedError:
                raise ArtifactError(f"{where}: {tensor.name} uses an unsupported GGUF type "
                                    f"{tensor.tensor_type.name}") from None
            shape = tuple(int(n) for n in reversed(tensor.shape.tolist()))
            halves.setdefault(found.group(1), {})[found.group(2)] = np.asarray(values, np.float32).reshape(shape)
    if fields.get("general.type", "adapter") != "adapter" or fields.get("adapter.type", "lora") != "lora":
        raise ArtifactError(f"{where}: the GGUF file is not a LoRA adapter")
    modules = {}
    for name, pair in halves.items():
        if set(pair) != {"a", "b"}:
            raise ArtifactError(f"{where}: {name} lacks its lora_{'b' if 'a' in pair else 'a'}")
        modules[name] = (pair["a"], pair["b"])
    if not modules:
        raise ArtifactError(f"{where}: the adapter holds no tensors")
    alpha = float(fields.get("adapter.lora.alpha", 0.0))
    return fields.get("general.architecture"), alpha, modules


def _field_value(field):
    import gguf

    if not field.types:
        return None
    if field.types[0] == gguf.GGUFValueType.STRING:
        return bytes(field.parts[field.data[0]]).decode("utf-8", errors="replace")
    if field.types[0] == gguf.GGUFValueType.ARRAY:
        return None
    return field.parts[field.data[0]][0].item()


def check_interpreter(bundle: Bundle, arch: str | None, prog: LoadedProgram, where: str) -> None:
    """Refuse a bundle made for another base model than ``prog`` (by name, then architecture)."""
    model_type = prog.program.model_info.get("model_type", "")
    interpreter = bundle.meta["interpreter"]
    expected = INTERPRETERS.get(interpreter)
    if expected is not None and expected != model_type:
        raise ArtifactError(f"{where} was made for {interpreter} ({expected}); the base program {prog.name} "
                            f"is {model_type or 'of unknown type'}: pass --base with an export of {interpreter}")
    if arch is not None and model_type and arch != GGUF_ARCHS.get(model_type, model_type):
        raise ArtifactError(f"{where}'s adapter is for {arch} models; the base program {prog.name} is {model_type}")


def bundle_artifact(bundle: Bundle, prog: LoadedProgram, base_hint: str, where: str) -> ProgramArtifact:
    """A paw program running ``bundle`` on ``prog``, as programasweights' runtime would."""
    from paw_mlx.programs.compile import compute_prefix
    from paw_mlx.programs.function import adapted

    arch, alpha, tensors = read_gguf_lora(bundle.adapter, where)
    check_interpreter(bundle, arch, prog, where)
    names = gguf_module_names(prog)
    modules = {}
    for name, pair in tensors.items():
        if name not in names:
            raise ArtifactError(f"{where}: adapter tensor {name} has no counterpart in the base program {prog.name}")
        modules[names[name]] = pair
    adapter = LoraAdapter(modules, alpha)
    try:
        check_adapter(adapter.scaled(), linear_sites(prog.program), where=f"{where}'s adapter")
    except ArtifactError as exc:
        raise ArtifactError(f"{exc} (was it made for another base model than {prog.name}?)") from None
    prefix_text, suffix_text = bundle.template.split(PLACEHOLDER)
    layout = PromptLayout("template", prefix_text, suffix_text)
    ids = prog.tokenizer.encode(prefix_text, add_special_tokens=False)
    runner = adapted(prog, adapter)
    prefix = compute_prefix(runner, ids) if ids else []
    spec = bundle.meta.get("spec") if isinstance(bundle.meta.get("spec"), str) else ""
    source = {"format": "programasweights .paw", "program_id": bundle.meta["program_id"],
              "interpreter": bundle.meta["interpreter"], "pseudo_program": bundle.pseudo_program}
    return ProgramArtifact(spec=spec or bundle.pseudo_program or bundle.meta["program_id"],
                           base_fingerprint=prog.fingerprint, base_hint=base_hint, layout=layout, prefix_ids=ids,
                           prefix=prefix, generation=GenerationSettings(BUNDLE_MAX_NEW_TOKENS, strip=True),
                           adapter=adapter, selection={"imported": source})


def load_bundle(path: str | Path, base: str | Path) -> ProgramArtifact:
    """The program of a ``.paw`` file for the base program ``base``."""
    from paw_mlx.programs.interpreter import interpreter, resolve_base

    bundle = read_bundle(path)
    base_path = resolve_base(base)
    return bundle_artifact(bundle, interpreter(base_path), str(base_path), Path(path).name)


def export_bundle(src: str | Path, out_dir: str | Path, base: str | Path, force: bool = False) -> ProgramArtifact:
    """``paw export program FILE.paw -o DIR --base BASE``: the bundle as a paw program directory."""
    from paw_mlx.programs.artifact import write_artifact
    from paw_mlx.programs.interpreter import resolve_base

    if Path(out_dir).exists() and not force:
        raise ArtifactError(f"{out_dir} already exists (use --force to replace it)")
    check_writable(out_dir, ArtifactError, folder=True)
    check_not_reading(out_dir, [src, resolve_base(base)], ArtifactError)
    artifact = load_bundle(src, base)
    write_artifact(artifact, out_dir, force=force)
    return artifact


# ----------------------------------------------------------------------------- writing


def gguf_lora_bytes(arch: str, alpha: float, tensors: dict[str, tuple[np.ndarray, np.ndarray]],
                    qtype: str = "F32") -> bytes:
    """A llama.cpp LoRA GGUF file holding ``tensors`` ({llama.cpp module name: (a, b)})."""
    import gguf

    kind = gguf.GGMLQuantizationType[qtype]
    with tempfile.TemporaryDirectory(prefix="paw-gguf-") as tmp:
        file = Path(tmp) / "adapter.gguf"
        writer = gguf.GGUFWriter(file, arch)
        writer.add_string("general.type", "adapter")
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(alpha))
        for name, (a, b) in sorted(tensors.items()):
            for half, values in (("a", a), ("b", b)):
                values = np.ascontiguousarray(values, dtype=np.float32)
                if kind not in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
                    writer.add_tensor(f"{name}.weight.lora_{half}", gguf.quants.quantize(values, kind),
                                      raw_dtype=kind)
                else:
                    dtype = np.float16 if kind == gguf.GGMLQuantizationType.F16 else np.float32
                    writer.add_tensor(f"{name}.weight.lora_{half}", values.astype(dtype))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        return file.read_bytes()


def write_bundle(artifact: ProgramArtifact, prog: LoadedProgram, out: str | Path, force: bool = False) -> Path:
    """Write a LoRA program as a ``.paw`` bundle (atomically: a temporary file, then a rename)."""
    out = Path(out)
    if out.exists() and not force:
        raise ArtifactError(f"{out} already exists (use --force to replace it)")
    check_writable(out, ArtifactError)
    if artifact.copy_rule is not None:  # nor does it hold outputs to words of the input
        raise ArtifactError("this program holds its outputs to words of its input (a copy rule), which a .paw "
                            "bundle cannot hold (compile it with `paw compile --format paw`)")
    if artifact.adapter is None:
        raise ArtifactError("a .paw bundle holds a LoRA adapter and this program has none "
                            "(compile it with the lora candidate)")
    layout = artifact.layout
    if layout.input_lead:  # the runtime appends a call's input as given: nothing can go before it
        raise ArtifactError("this program puts a space before its inputs, which a .paw bundle cannot hold "
                            "(compile it with `paw compile --format paw`)")
    if (PLACEHOLDER in layout.prefix_text + layout.suffix_text
            or prog.tokenizer.encode(layout.prefix_text, add_special_tokens=False) != list(artifact.prefix_ids)):
        raise ArtifactError(f"this program's prompt cannot be written as a template with one {PLACEHOLDER}")
    names = {module: name for name, module in gguf_module_names(prog).items()}
    missing = [m for m in artifact.adapter.modules if m not in names]
    if missing:
        raise ArtifactError(f"llama.cpp has no tensor name for {missing[0]}")
    arch = gguf_arch(prog.program.model_info.get("model_type", ""))
    modules = {names[m]: ab for m, ab in artifact.adapter.modules.items()}
    adapter = gguf_lora_bytes(arch, artifact.adapter.alpha, modules)
    template = artifact.layout.prefix_text + PLACEHOLDER + artifact.layout.suffix_text
    source = prog.program.model_info.get("source", {})
    meta = {
        "program_id": hashlib.sha256(template.encode("utf-8") + adapter).hexdigest()[:32],
        "interpreter": source.get("id") or prog.name,
        "spec": artifact.spec,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "compiler_snapshot": "paw",
        "paw": {"base_fingerprint": prog.fingerprint, "kept": (artifact.selection or {}).get("kept")},
    }
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, content in (("meta.json", json.dumps(meta, indent=1, ensure_ascii=False).encode("utf-8")),
                              ("adapter.gguf", adapter), ("prompt_template.txt", template.encode("utf-8")),
                              ("pseudo_program.txt", artifact.spec.encode("utf-8"))):
            info = zipfile.ZipInfo(name, date_time=(2024, 1, 1, 0, 0, 0))
            info.external_attr = (stat.S_IFREG | 0o644) << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(info, content)
    out.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_bytes(out, buffer.getvalue())


def compile_bundle(spec: str, out: str | Path, *, base, examples, options, force: bool = False,
                   max_new_tokens: int | None = None, progress_bar=None) -> ProgramArtifact:
    """``paw compile --format paw``: a LoRA program trained as a bundle runs it (the adapter
    applied to the prefix too), written as a ``.paw`` file."""
    from paw_mlx.programs.compile import compile
    from paw_mlx.programs.interpreter import interpreter, resolve_base

    if examples is None:
        raise ArtifactError("--format paw writes a LoRA program: give --examples to train it")
    if Path(out).exists() and not force:
        raise ArtifactError(f"{out} already exists (use --force to replace it)")
    check_writable(out, ArtifactError)
    check_not_reading(out, [resolve_base(base), examples if isinstance(examples, (str, Path)) else None],
                      ArtifactError)
    options.check()  # what the caller gave, before it becomes the one LoRA candidate a bundle holds
    # the runtime appends a call's input as given (no lead before it) and strips the output (so
    # an output lead is read as the program writes it); it enforces no copy rule
    options = replace(options, candidates=("lora",), lora=replace(options.lora, adapt_prefix=True), input_lead=False,
                      copy_rule=False)
    options.check_base(resolve_base(base))  # the rank against the layers, before the weights load
    prog = interpreter(resolve_base(base))
    gguf_module_names(prog)  # an architecture llama.cpp cannot name fails here, before training
    if progress_bar is not None:
        with progress_bar() as progress:
            artifact = compile(spec, base=base, examples=examples, max_new_tokens=max_new_tokens,
                               options=options, progress=progress)
    else:
        artifact = compile(spec, base=base, examples=examples, max_new_tokens=max_new_tokens, options=options)
    write_bundle(artifact, prog, out, force=force)
    return artifact
