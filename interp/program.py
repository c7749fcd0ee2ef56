"""Load and validate a program directory (prog.json + consts + tokenizer).

Validation happens before any weight is touched, so a bad program fails in
milliseconds with one line that names the problem: the format version, an unknown op,
a wrong arity or attribute, an attribute outside the range its schema entry states, a
reference to an undefined value, a const whose dtype or shape disagrees with the file,
a safetensors header that does not describe its file, or a truncated weights file.
Every field is type-checked here, so nothing later meets a value of the wrong kind.

The consts are one ``consts.safetensors`` or, for large programs, shards named
``consts-00001-of-00003.safetensors`` listed by ``consts.safetensors.index.json`` (Hugging
Face's layout). Every reader goes through ``read_consts_files``, which lists the files
and their headers, and ``load_consts``, which maps them lazily into MLX.
"""

from __future__ import annotations

import math
import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from interp import limits, schema
from interp.errors import PawError, ProgramError, UnknownOpError, WeightsError, first_line
from interp.jsonfile import parse_json, read_json_object

PROGRAM_FILE = "prog.json"
CONSTS_FILE = "consts.safetensors"
CONSTS_INDEX_FILE = "consts.safetensors.index.json"
MANIFEST_FILE = "manifest.json"
_SHARD_NAME = re.compile(r"consts-\d{5}-of-\d{5}\.safetensors")
#: the inputs the interpreter feeds; a program takes input_ids and may take position_ids
FED_INPUTS = ("input_ids", "position_ids")
#: more KV-cache layers than any model has: a sanity bound on state.kv_cache.layers
MAX_LAYERS = 100_000
#: the kinds of ``state`` a program may declare: attention's KV caches, short convolutions' conv states,
#: the recurrent states a program may keep after its KV caches, in the cache list's order, each with the op
#: that reads and updates it: short convolutions' conv states, gated delta rules' matrices, state-space
#: layers' SSM states, RG-LRU layers' LRU states
RECURRENT_STATES = (("conv", "causal_conv1d"), ("delta", "gated_delta_rule"), ("ssm", "ssm_scan"),
                    ("lru", "lru_scan"))
STATE_KINDS = frozenset({"kv_cache", *(kind for kind, _ in RECURRENT_STATES)})
#: safetensors' own bound on the JSON header
MAX_HEADER_BYTES = 100 << 20

# safetensors dtype codes -> schema dtype names
ST_DTYPES = {
    "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64", "I32": "int32",
    "I16": "int16", "I8": "int8", "U32": "uint32", "U16": "uint16", "U8": "uint8", "BOOL": "bool",
}


@dataclass(frozen=True)
class Node:
    op: str
    inputs: tuple
    attrs: dict
    outputs: tuple[str, ...]


@dataclass(frozen=True)
class ConstsFile:
    """One safetensors file of a program's consts and its header (const name -> dtype, shape, offsets)."""

    path: Path
    header: dict


@dataclass
class Program:
    """A validated program: the parsed prog.json plus where its files live."""

    directory: Path
    spec: dict
    nodes: list[Node]
    manifest: dict = field(default_factory=dict)
    #: ids input_ids may hold: the rows of the embedding that reads them (None if unknown)
    vocab_size: int | None = None
    consts_files: list[ConstsFile] = field(default_factory=list)

    @property
    def model_info(self) -> dict:
        return self.spec.get("model", {})

    @property
    def consts_path(self) -> Path:
        """The consts file of an unsharded program (a sharded one has ``consts_files``)."""
        return self.directory / CONSTS_FILE

    @property
    def defining_files(self) -> list[str]:
        """The files its fingerprint is made of (``defining_files``)."""
        return defining_files([PROGRAM_FILE, *(f.path.name for f in self.consts_files)]
                              + ([CONSTS_INDEX_FILE] if (self.directory / CONSTS_INDEX_FILE).is_file() else []))

    @property
    def fingerprint(self) -> str:
        return self.manifest.get("fingerprint", "")

    @property
    def num_layers(self) -> int:
        """KV cache slots (attention layers): the first entries of the program's cache list."""
        return self.state_layers("kv_cache")

    def state_layers(self, kind: str) -> int:
        """Slots of one kind of state (``kv_cache`` or a kind of ``RECURRENT_STATES``); 0 if not kept."""
        return int(self.spec.get("state", {}).get(kind, {}).get("layers", 0))

    @property
    def recurrent_states(self) -> dict[str, int]:
        """The recurrent state kinds the program keeps beside its KV caches, with their slot counts, in the
        cache list's order (``RECURRENT_STATES``: conv, delta, ssm, lru)."""
        counts = {kind: self.state_layers(kind) for kind, _ in RECURRENT_STATES}
        return {kind: count for kind, count in counts.items() if count}

    @property
    def recurrent(self) -> bool:
        """Whether the program keeps state other than KV caches (conv, delta, SSM or LRU states), which the paths
        that carry only KV caches (slot batches, KV prefixes, splits over ranks) refuse."""
        return bool(self.recurrent_states)


def resolve_program_dir(path: str | Path) -> Path:
    """Accept a program directory or the path of its prog.json."""
    p = Path(path).expanduser()
    if not p.exists():
        raise ProgramError(f"no such file or directory: {p}")
    if p.is_file():
        if p.name != PROGRAM_FILE:
            raise ProgramError(f"{p} is not a program: expected a directory holding {PROGRAM_FILE}, or that file")
        return p.parent
    if not (p / PROGRAM_FILE).is_file():
        raise ProgramError(f"{p} is not a program directory: it has no {PROGRAM_FILE}")
    return p


def read_program(path: str | Path, known_ops: set[str] | None = None) -> Program:
    """Parse and validate prog.json (and the consts header); loads no weights."""
    directory = resolve_program_dir(path)
    where = directory / PROGRAM_FILE
    spec = read_json_object(where)
    _check_format(spec, where)
    _check_model_info(spec.get("model", {}), where)
    nodes = _check_graph(spec, known_ops if known_ops is not None else set(schema.OPS))
    files = read_consts_files(directory)
    _check_consts(spec, files)
    manifest = read_manifest(directory)
    return Program(directory=directory, spec=spec, nodes=nodes, manifest=manifest,
                   vocab_size=_vocab_size(spec, nodes, where), consts_files=files)


def read_manifest(directory: Path, error: type[PawError] = ProgramError) -> dict:
    """manifest.json of ``directory`` if there is one ({} otherwise), its fields type-checked."""
    path = directory / MANIFEST_FILE
    if not path.is_file():
        return {}
    manifest = read_json_object(path, error)
    if not isinstance(manifest.get("fingerprint", ""), str):
        raise error(f"{path}: 'fingerprint' must be a string")
    files = manifest.get("files", {})
    if not isinstance(files, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in files.items()):
        raise error(f"{path}: 'files' must map file names to sha256 hex digests")
    return manifest


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_format(spec: dict, path: Path) -> None:
    name = spec.get("format")
    if name != schema.FORMAT_NAME:
        raise ProgramError(f"{path} is not a paw program (format {name!r}, expected {schema.FORMAT_NAME!r})")
    version = spec.get("version")
    if not _is_int(version) or version not in schema.READABLE_VERSIONS:
        readable = ", ".join(str(v) for v in schema.READABLE_VERSIONS)
        raise ProgramError(
            f"{path} has format version {version!r}; this paw reads version {readable}"
            + (" (upgrade paw to read newer programs)"
               if _is_int(version) and version > max(schema.READABLE_VERSIONS) else "")
        )
    for key, kind in (("inputs", list), ("outputs", list), ("consts", dict), ("nodes", list)):
        if key not in spec:
            raise ProgramError(f"{path} lacks the required field {key!r}")
        if not isinstance(spec[key], kind):
            raise ProgramError(f"{path}: {key!r} must be a JSON {'array' if kind is list else 'object'}")
    for key in ("model", "state"):
        if not isinstance(spec.get(key, {}), dict):
            raise ProgramError(f"{path}: {key!r} must be a JSON object")
    kv = spec.get("state", {}).get("kv_cache", {})
    layers = kv.get("layers", 0) if isinstance(kv, dict) else None
    if not _is_int(layers) or not 0 <= layers <= MAX_LAYERS:
        raise ProgramError(f"{path}: state.kv_cache.layers must be an integer in [0, {MAX_LAYERS}]")
    unknown = sorted(set(spec.get("state", {})) - STATE_KINDS)
    if unknown:
        raise ProgramError(f"{path}: state.{unknown[0]} is not a kind of state this paw keeps "
                           f"({', '.join(sorted(STATE_KINDS))})")
    for kind, _ in RECURRENT_STATES:
        entry = spec.get("state", {}).get(kind, {})
        count = entry.get("layers", 0) if isinstance(entry, dict) else None
        if not _is_int(count) or not 0 <= count <= MAX_LAYERS:
            raise ProgramError(f"{path}: state.{kind}.layers must be an integer in [0, {MAX_LAYERS}]")


def _check_model_info(info: dict, path: Path) -> None:
    """The metadata the runner reads: each field of the type it expects, when present."""
    def bad(key: str, want: str) -> ProgramError:
        return ProgramError(f"{path}: model.{key} must be {want}, got {info[key]!r:.60}")

    length = info.get("context_length")
    if "context_length" in info and not (_is_int(length) and 0 < length <= schema.INT32_MAX):
        raise bad("context_length", "a positive integer")
    if "vocab_size" in info and not (_is_int(info["vocab_size"]) and 0 <= info["vocab_size"] <= schema.INT32_MAX):
        raise bad("vocab_size", "an integer >= 0")
    eos = info.get("eos_token_ids", [])
    if not isinstance(eos, list) or not all(_is_int(t) and 0 <= t <= schema.INT32_MAX for t in eos):
        raise bad("eos_token_ids", "a list of token ids")
    if info.get("bos_token_id") is not None and not _is_int(info["bos_token_id"]):
        raise bad("bos_token_id", "a token id or null")
    if not isinstance(info.get("source", {}), dict):
        raise bad("source", "an object")
    for key in ("architecture", "model_type", "dtype"):
        if key in info and not isinstance(info[key], str):
            raise bad(key, "a string")


def _check_graph(spec: dict, known_ops: set[str]) -> list[Node]:
    defined: dict[str, str] = {}  # value name -> "tensor" | "symint"
    for index, inp in enumerate(spec["inputs"]):
        if not isinstance(inp, dict) or not isinstance(inp.get("name"), str):
            raise ProgramError(f"input {index} must be an object with a 'name' string")
        name = inp["name"]
        if name not in FED_INPUTS:
            raise ProgramError(f"input {name!r} is not one the interpreter feeds ({', '.join(FED_INPUTS)})")
        if name in defined:
            raise ProgramError(f"input {name!r} is declared twice")
        _check_dtype(inp.get("dtype"), f"input {name!r}")
        defined[name] = "tensor"
    if "input_ids" not in defined:
        raise ProgramError("the program has no 'input_ids' input")
    for name, meta in spec["consts"].items():
        if name in defined:
            raise ProgramError(f"const {name!r} has the name of an input")
        if not isinstance(meta, dict):
            raise ProgramError(f"const {name!r} must be an object with dtype and shape")
        _check_dtype(meta.get("dtype"), f"const {name!r}")
        shape = meta.get("shape")
        if not isinstance(shape, list) or not all(_is_int(d) and 0 <= d <= schema.INT32_MAX for d in shape):
            raise ProgramError(f"const {name!r} has shape {shape!r:.60}; expected a list of sizes in [0, 2**31)")
        defined[name] = "tensor"

    state = spec.get("state", {})
    layers = {kind: state.get(kind, {}).get("layers", 0) for kind in ("kv_cache", *(k for k, _ in RECURRENT_STATES))}
    nodes: list[Node] = []
    for index, raw in enumerate(spec["nodes"]):
        where = f"node {index}"
        if not isinstance(raw, dict):
            raise ProgramError(f"{where} must be an object with op, inputs, attrs and outputs")
        op = raw.get("op")
        if not isinstance(op, str) or op not in schema.OPS:
            raise UnknownOpError(f"{where} uses unknown op {op!r:.60}: it is not in this paw's op schema")
        if op not in known_ops:
            raise UnknownOpError(f"{where} uses op {op!r}, which this interpreter does not implement")
        where = f"node {index} ({op})"
        spec_op = schema.OPS[op]
        inputs = raw.get("inputs", [])
        attrs = raw.get("attrs", {})
        outputs = raw.get("outputs", [])
        if not isinstance(inputs, list) or not isinstance(attrs, dict) or not isinstance(outputs, list):
            raise ProgramError(f"{where}: inputs and outputs must be arrays and attrs an object")
        if len(inputs) < len(spec_op.inputs) and all(arg.kind == schema.OPTIONAL_TENSOR
                                                     for arg in spec_op.inputs[len(inputs):]):
            inputs = inputs + [None] * (len(spec_op.inputs) - len(inputs))  # an optional input added later
        if len(inputs) != len(spec_op.inputs):
            raise ProgramError(f"{where} has {len(inputs)} inputs; op {op!r} takes {len(spec_op.inputs)}")
        for arg, value in zip(spec_op.inputs, inputs, strict=True):
            _check_input(arg, value, defined, where)
        for key in attrs:
            if key not in spec_op.attr_by_name:
                raise ProgramError(f"{where} has unknown attribute {key!r:.60}")
        for arg in spec_op.attrs:
            if arg.required and arg.name not in attrs:
                raise ProgramError(f"{where} lacks required attribute {arg.name!r}")
            if arg.name in attrs:
                _check_attr(arg, attrs[arg.name], defined, where)
        _check_node_attrs(op, attrs, layers, where)
        variadic = spec_op.outputs and spec_op.outputs[-1].endswith("...")
        if not outputs or (not variadic and len(outputs) != len(spec_op.outputs)):
            raise ProgramError(f"{where} has {len(outputs)} outputs; op {op!r} gives {len(spec_op.outputs)}")
        if op == "split" and isinstance(attrs.get("sizes"), list) and len(outputs) != len(attrs["sizes"]):
            raise ProgramError(f"{where} has {len(outputs)} outputs for {len(attrs['sizes'])} sizes")
        for out in outputs:
            if not isinstance(out, str) or out in defined:
                raise ProgramError(f"{where} redefines or misnames output {out!r:.60}")
            defined[out] = "symint" if spec_op.symbolic else "tensor"
        nodes.append(Node(op, tuple(inputs), dict(attrs), tuple(outputs)))

    names = []
    for out in spec["outputs"]:
        name = out.get("name") if isinstance(out, dict) else None
        if not isinstance(name, str) or defined.get(name) != "tensor":
            raise ProgramError(f"program output {name!r:.60} is never computed as a tensor")
        names.append(name)
    if "logits" not in names:
        raise ProgramError("the program has no output named 'logits'")
    return nodes


def names_in(value: Any) -> Iterator[str]:
    """The strings in a node's input or attribute value, however nested in lists: the
    names a value may refer to (tensors, symbolic sizes)."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, list | tuple):
        for item in value:
            yield from names_in(item)


def _check_node_attrs(op: str, attrs: dict, layers: dict[str, int], where: str) -> None:
    """Checks that span attributes or need the program: cache slots, literal allocations.

    ``layers`` holds each state kind's slot count (``kv_cache``, then ``RECURRENT_STATES``), the cache list's order.
    """
    kv = layers["kv_cache"]
    if op in schema.KV_CACHE_OPS and _is_int(attrs.get("layer")) and attrs["layer"] >= kv:
        raise ProgramError(f"{where}: layer {attrs['layer']} is not below state.kv_cache.layers ({kv})")
    start = kv
    for kind, owner in RECURRENT_STATES:
        count = layers[kind] if _is_int(layers[kind]) else 0
        if op == owner and _is_int(attrs.get("layer")) and not start <= attrs["layer"] < start + count:
            raise ProgramError(f"{where}: layer {attrs['layer']} is not a state.{kind} slot ({start} to {start} + "
                               f"state.{kind}.layers {count})")
        start += count
    if op == "full" and all(_is_int(d) for d in attrs["shape"]):
        limits.check_shape(attrs["shape"], limits.dtype_bytes(attrs["dtype"]), f"{where}: its output")
    if op == "arange" and all(_is_int(attrs.get(k, 0)) for k in ("start", "end", "step")):
        length = limits.arange_length(attrs.get("start", 0), attrs["end"], attrs.get("step", 1))
        limits.check_shape([length], limits.dtype_bytes(attrs.get("dtype", "int64")), f"{where}: its output")


def _check_dtype(dtype: Any, what: str) -> None:
    if not isinstance(dtype, str) or dtype not in schema.DTYPES:
        raise ProgramError(f"{what} has unknown dtype {dtype!r:.60}")


def _check_ref(value: Any, defined: dict[str, str], where: str, want: str) -> None:
    if not isinstance(value, str):
        raise ProgramError(f"{where} expects a reference to a {want}, got {value!r:.60}")
    kind = defined.get(value)
    if kind is None:
        raise ProgramError(f"{where} uses {value!r:.60} before it is defined")
    if kind != want:
        raise ProgramError(f"{where} expects a {want} but {value!r} is a {kind}")


def _check_input(arg: schema.Arg, value: Any, defined: dict[str, str], where: str) -> None:
    what = f"{where} input {arg.name!r}"
    if arg.kind == schema.TENSOR:
        _check_ref(value, defined, what, "tensor")
    elif arg.kind == schema.OPTIONAL_TENSOR:
        if value is not None:
            _check_ref(value, defined, what, "tensor")
    elif arg.kind == schema.TENSOR_LIST:
        if not isinstance(value, list) or not value:
            raise ProgramError(f"{what} must be a non-empty list of tensor references")
        for item in value:
            _check_ref(item, defined, what, "tensor")
    elif arg.kind == schema.TENSOR_OR_SCALAR:
        if isinstance(value, (int, float)):  # bools included
            if _is_int(value) and abs(value) > 2**63 - 1:
                raise ProgramError(f"{what}: an integer literal does not fit 64 bits")
        else:
            _check_ref(value, defined, what, "tensor")
    elif arg.kind == schema.SYMINT:
        if not _is_int(value):
            _check_ref(value, defined, what, "symint")


def _check_attr(arg: schema.Arg, value: Any, defined: dict[str, str], where: str) -> None:
    what = f"{where} attribute {arg.name!r}"
    if value is None and not arg.required and arg.default is None:
        return
    ok = True
    literals: list = []
    if arg.kind == schema.INT:
        if isinstance(value, str):
            _check_ref(value, defined, what, "symint")
        else:
            ok = _is_int(value)
            literals = [value]
    elif arg.kind == schema.INTS:
        ok = isinstance(value, list)
        for item in value if ok else []:
            if isinstance(item, str):
                _check_ref(item, defined, what, "symint")
            elif not _is_int(item):
                ok = False
            else:
                literals.append(item)
    elif arg.kind == schema.FLOAT:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        literals = [value] if ok else []
    elif arg.kind == schema.BOOL:
        ok = isinstance(value, bool)
    elif arg.kind == schema.DTYPE:
        ok = isinstance(value, str) and value in schema.DTYPES
    elif arg.kind == schema.STR:
        ok = isinstance(value, str)
        literals = [value] if ok else []
    if not ok:
        raise ProgramError(f"{what} must be of kind {arg.kind}, got {value!r:.60}")
    for item in literals:
        if _is_int(item) and abs(item) > 2**63 - 1:
            raise ProgramError(f"{what}: an integer does not fit 64 bits")
        problem = arg.range_problem(item)
        if problem:
            raise ProgramError(f"{what} is {item!r:.60}; it {problem}")


def _vocab_size(spec: dict, nodes: list[Node], path: Path) -> int | None:
    """The token ids the program takes, 0 .. n-1: model.vocab_size, checked against the rows of
    the embedding that reads input_ids (or those rows, when the program does not declare it).

    An embedding may hold more rows than the vocabulary: Llama 3.2 Vision's text model keeps 8
    rows for image tokens that its LM head never produces and a text program never reads. An
    embedding with fewer rows than the vocabulary could not look a token up: refused.
    """
    rows = None
    for node in nodes:
        if node.op in ("embedding", "quantized_embedding") and node.inputs[-1] == "input_ids":
            meta = spec["consts"].get(node.inputs[0])
            if meta is not None and meta["shape"]:
                rows = meta["shape"][0] if rows is None else min(rows, meta["shape"][0])
    declared = spec.get("model", {}).get("vocab_size")
    if rows is not None and declared and declared > rows:
        raise ProgramError(f"{path}: model.vocab_size is {declared}, but the embedding of input_ids has only "
                           f"{rows} rows")
    return declared or rows


def read_safetensors_header(path: Path, error: type[PawError] = WeightsError,
                            element_bytes: dict[str, int] | None = None) -> dict:
    """The JSON header of a safetensors file, checked against the file itself.

    Every entry must have a known dtype, a shape of sizes in [0, 2**31) and data offsets
    that hold exactly that many bytes, inside the file and overlapping no other tensor:
    a header that does not describe its file is refused before MLX reads it.
    ``element_bytes`` (dtype code -> bytes) are the dtypes accepted; default: those a
    program may hold (``ST_DTYPES``).
    """
    if element_bytes is None:
        element_bytes = {code: limits.dtype_bytes(name) for code, name in ST_DTYPES.items()}
    if not path.is_file():
        raise error(f"missing weights file {path}")
    size = path.stat().st_size
    try:
        with path.open("rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise error(f"{path} is truncated: {size} bytes, not even a header")
            (header_len,) = struct.unpack("<Q", head)
            if header_len > size - 8:
                raise error(f"{path} is truncated: its header claims {header_len} bytes, the file has {size}")
            if header_len > MAX_HEADER_BYTES:
                raise error(f"{path} has a {header_len}-byte header; safetensors allows {MAX_HEADER_BYTES}")
            raw = fh.read(header_len)
    except OSError as exc:
        raise error(f"cannot read {path}: {exc.strerror or exc}") from exc
    try:
        header = parse_json(raw, str(path), error)
    except PawError:
        raise error(f"{path} is not a safetensors file (unreadable header)") from None
    if not isinstance(header, dict):
        raise error(f"{path} is not a safetensors file (its header is not an object)")
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise error(f"{path}: __metadata__ must map names to strings")
    spans = []
    for name, meta in header.items():
        what = f"{path}: tensor {name!r:.60}"
        if not isinstance(meta, dict) or not isinstance(meta.get("dtype"), str) or meta["dtype"] not in element_bytes:
            raise error(f"{what} has no dtype paw reads")
        shape, offsets = meta.get("shape"), meta.get("data_offsets")
        if not isinstance(shape, list) or not all(_is_int(d) and 0 <= d <= schema.INT32_MAX for d in shape):
            raise error(f"{what} has a malformed shape")
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_int(o) for o in offsets)
                or not 0 <= offsets[0] <= offsets[1]):
            raise error(f"{what} has malformed data_offsets")
        need = math.prod(shape) * element_bytes[meta["dtype"]]
        if offsets[1] - offsets[0] != need:
            raise error(f"{what}: its offsets hold {offsets[1] - offsets[0]} bytes, its shape needs {need}")
        spans.append((offsets[0], offsets[1], name))
    spans.sort()
    for (_, end, first), (start, _, second) in zip(spans, spans[1:], strict=False):
        if start < end:
            raise error(f"{path}: tensors {first!r:.40} and {second!r:.40} overlap")
    data_end = spans[-1][1] if spans else 0
    if 8 + header_len + data_end > size:
        raise error(f"{path} is truncated: its tensors need {8 + header_len + data_end} bytes, the file has {size}")
    return header


def defining_files(names) -> list[str]:
    """The files a program's fingerprint is made of, in order: prog.json and its weights
    (``consts.safetensors``, or the shard index and then the shards)."""
    names = set(names)
    if CONSTS_FILE in names or CONSTS_INDEX_FILE not in names:
        return [PROGRAM_FILE, CONSTS_FILE]
    return [PROGRAM_FILE, CONSTS_INDEX_FILE, *sorted(n for n in names if _SHARD_NAME.fullmatch(n))]


def shard_file_name(index: int, count: int) -> str:
    """``consts-00002-of-00005.safetensors``: the name of shard ``index`` (from 1) of ``count``."""
    return f"consts-{index:05d}-of-{count:05d}.safetensors"


def read_consts_files(directory: Path) -> list[ConstsFile]:
    """The program's consts files with their headers: the one way in to a program's weights.

    A program has ``consts.safetensors``, or shards listed by ``consts.safetensors.index.json``;
    the index is checked against the shards' headers (every const in exactly the file the
    index names, no file outside the directory). Reads headers only.
    """
    index_path = directory / CONSTS_INDEX_FILE
    if not index_path.is_file():
        path = directory / CONSTS_FILE
        return [ConstsFile(path, read_safetensors_header(path))]
    index = read_json_object(index_path, WeightsError)
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise WeightsError(f"{index_path.name} has no weight_map of const names to shard files")
    names = sorted(set(weight_map.values()), key=str)
    for number, name in enumerate(names, start=1):
        if not isinstance(name, str) or name != shard_file_name(number, len(names)):
            raise WeightsError(f"{index_path.name} names {name!r}, which is not a shard of {len(names)} "
                               f"(expected {shard_file_name(1, len(names))} "
                               f"to {shard_file_name(len(names), len(names))})")
    files = [ConstsFile(directory / name, read_safetensors_header(directory / name)) for name in names]
    where = {}
    for consts_file in files:
        for const in consts_file.header:
            if const in where:
                raise WeightsError(f"const {const!r} is stored twice: in {where[const]} and {consts_file.path.name}")
            where[const] = consts_file.path.name
    for const, name in weight_map.items():
        if where.get(const) != name:
            raise WeightsError(f"{index_path.name} puts {const!r} in {name}, "
                               + (f"but it is in {where[const]}" if const in where else "which lacks it"))
    return files


def load_consts(program: Program, names: set[str] | None = None) -> dict:
    """The consts as lazily loaded MLX arrays (nothing is read until evaluated).

    ``names`` limits the result to those consts and opens only the files that hold them
    (a process that runs part of the model loads part of it).
    """
    import mlx.core as mx

    consts: dict = {}
    for consts_file in program.consts_files or read_consts_files(program.directory):
        if names is not None and not names.intersection(consts_file.header):
            continue
        try:
            arrays = mx.load(str(consts_file.path))
        except Exception as exc:  # mlx raises plain RuntimeError/ValueError for bad files
            raise WeightsError(f"cannot read {consts_file.path}: {first_line(exc)}") from exc
        consts.update(arrays if names is None else {k: v for k, v in arrays.items() if k in names})
    return consts


def find_nan(arrays: dict) -> str | None:
    """The name of the first floating-point array of ``arrays`` holding a NaN, or None.

    NaN is never a weight (corruption, a bad conversion): every token after it would be
    nonsense, sampled from NaN logits. One sum per array finds candidates in one pass
    without a temporary as large as the weights (a sum also turns NaN where +inf meets
    -inf, so a candidate is confirmed with ``isnan``).
    """
    import mlx.core as mx

    names = [name for name, array in arrays.items() if mx.issubdtype(array.dtype, mx.floating)]
    sums = [mx.sum(arrays[name]) for name in names]
    mx.eval(sums)
    for name, total in zip(names, sums, strict=True):
        if math.isnan(total.item()) and mx.any(mx.isnan(arrays[name])).item():
            return name
    return None


def _check_consts(spec: dict, files: list[ConstsFile]) -> None:
    where = {name: consts_file for consts_file in files for name in consts_file.header}
    for name, meta in spec["consts"].items():
        consts_file = where.get(name)
        if consts_file is None:
            holder = files[0].path.name if len(files) == 1 else "the consts shards"
            raise WeightsError(f"{holder} lacks the const {name!r} that prog.json declares")
        stored = consts_file.header[name]
        dtype = ST_DTYPES[stored["dtype"]]
        if dtype != meta["dtype"] or list(stored["shape"]) != list(meta["shape"]):
            raise WeightsError(
                f"const {name!r}: prog.json says {meta['dtype']}{list(meta['shape'])}, "
                f"{consts_file.path.name} holds {dtype}{list(stored['shape'])}"
            )
