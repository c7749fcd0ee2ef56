"""Load and validate a program directory (prog.json + consts + tokenizer).

Validation happens before any weight is touched, so a bad program fails in
milliseconds with one line that names the problem: the format version, an unknown op,
a wrong arity or attribute, a reference to an undefined value, a const whose dtype or
shape disagrees with the file, or a truncated weights file.

The consts are one ``consts.safetensors`` or, for large programs, shards named
``consts-00001-of-00003.safetensors`` listed by ``consts.safetensors.index.json`` (Hugging
Face's layout). Every reader goes through ``read_consts_files``, which lists the files
and their headers, and ``load_consts``, which maps them lazily into MLX.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from interp import schema
from interp.errors import ProgramError, UnknownOpError, WeightsError

PROGRAM_FILE = "prog.json"
CONSTS_FILE = "consts.safetensors"
CONSTS_INDEX_FILE = "consts.safetensors.index.json"
MANIFEST_FILE = "manifest.json"

# safetensors dtype codes -> schema dtype names
_ST_DTYPES = {
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
    consts_files: list[ConstsFile] = field(default_factory=list)

    @property
    def model_info(self) -> dict:
        return self.spec.get("model", {})

    @property
    def consts_path(self) -> Path:
        """The consts file of an unsharded program (a sharded one has ``consts_files``)."""
        return self.directory / CONSTS_FILE

    @property
    def fingerprint(self) -> str:
        return self.manifest.get("fingerprint", "")

    @property
    def num_layers(self) -> int:
        return int(self.spec.get("state", {}).get("kv_cache", {}).get("layers", 0))


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
    spec = _read_json(directory / PROGRAM_FILE)
    _check_format(spec, directory / PROGRAM_FILE)
    nodes = _check_graph(spec, known_ops if known_ops is not None else set(schema.OPS))
    files = read_consts_files(directory)
    _check_consts(spec, files)
    manifest_path = directory / MANIFEST_FILE
    manifest = _read_json(manifest_path) if manifest_path.is_file() else {}
    return Program(directory=directory, spec=spec, nodes=nodes, manifest=manifest, consts_files=files)


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise ProgramError(f"cannot read {path}: {exc}") from None
    except json.JSONDecodeError as exc:
        raise ProgramError(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(data, dict):
        raise ProgramError(f"{path} must hold a JSON object")
    return data


def _check_format(spec: dict, path: Path) -> None:
    name = spec.get("format")
    if name != schema.FORMAT_NAME:
        raise ProgramError(f"{path} is not a paw program (format {name!r}, expected {schema.FORMAT_NAME!r})")
    version = spec.get("version")
    if version not in schema.READABLE_VERSIONS:
        readable = ", ".join(str(v) for v in schema.READABLE_VERSIONS)
        raise ProgramError(
            f"{path} has format version {version!r}; this paw reads version {readable}"
            + (" (upgrade paw to read newer programs)" if isinstance(version, int) and version > max(schema.READABLE_VERSIONS) else "")
        )
    for key in ("inputs", "outputs", "consts", "nodes"):
        if key not in spec:
            raise ProgramError(f"{path} lacks the required field {key!r}")


def _check_graph(spec: dict, known_ops: set[str]) -> list[Node]:
    defined: dict[str, str] = {}  # value name -> "tensor" | "symint"
    for inp in spec["inputs"]:
        _check_dtype(inp.get("dtype"), f"input {inp.get('name')!r}")
        defined[inp["name"]] = "tensor"
    for name, meta in spec["consts"].items():
        _check_dtype(meta.get("dtype"), f"const {name!r}")
        defined[name] = "tensor"

    nodes: list[Node] = []
    for index, raw in enumerate(spec["nodes"]):
        where = f"node {index}"
        op = raw.get("op")
        if op not in schema.OPS:
            raise UnknownOpError(f"{where} uses unknown op {op!r}: it is not in this paw's op schema")
        if op not in known_ops:
            raise UnknownOpError(f"{where} uses op {op!r}, which this interpreter does not implement")
        where = f"node {index} ({op})"
        spec_op = schema.OPS[op]
        inputs = raw.get("inputs", [])
        attrs = raw.get("attrs", {})
        outputs = raw.get("outputs", [])
        if len(inputs) != len(spec_op.inputs):
            raise ProgramError(f"{where} has {len(inputs)} inputs; op {op!r} takes {len(spec_op.inputs)}")
        for arg, value in zip(spec_op.inputs, inputs, strict=True):
            _check_input(arg, value, defined, where)
        for key in attrs:
            if key not in spec_op.attr_by_name:
                raise ProgramError(f"{where} has unknown attribute {key!r}")
        for arg in spec_op.attrs:
            if arg.required and arg.name not in attrs:
                raise ProgramError(f"{where} lacks required attribute {arg.name!r}")
            if arg.name in attrs:
                _check_attr(arg, attrs[arg.name], defined, where)
        variadic = spec_op.outputs and spec_op.outputs[-1].endswith("...")
        if not outputs or (not variadic and len(outputs) != len(spec_op.outputs)):
            raise ProgramError(f"{where} has {len(outputs)} outputs; op {op!r} gives {len(spec_op.outputs)}")
        for out in outputs:
            if not isinstance(out, str) or out in defined:
                raise ProgramError(f"{where} redefines or misnames output {out!r}")
            defined[out] = "symint" if spec_op.symbolic else "tensor"
        nodes.append(Node(op, tuple(inputs), dict(attrs), tuple(outputs)))

    for out in spec["outputs"]:
        if out.get("name") not in defined:
            raise ProgramError(f"program output {out.get('name')!r} is never computed")
    return nodes


def _check_dtype(dtype: Any, what: str) -> None:
    if dtype not in schema.DTYPES:
        raise ProgramError(f"{what} has unknown dtype {dtype!r}")


def _check_ref(value: Any, defined: dict[str, str], where: str, want: str) -> None:
    if not isinstance(value, str):
        raise ProgramError(f"{where} expects a reference to a {want}, got {value!r}")
    kind = defined.get(value)
    if kind is None:
        raise ProgramError(f"{where} uses {value!r} before it is defined")
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
        if not isinstance(value, (int, float, bool)):
            _check_ref(value, defined, what, "tensor")
    elif arg.kind == schema.SYMINT:
        if not isinstance(value, int):
            _check_ref(value, defined, what, "symint")


def _check_attr(arg: schema.Arg, value: Any, defined: dict[str, str], where: str) -> None:
    what = f"{where} attribute {arg.name!r}"
    if value is None and not arg.required and arg.default is None:
        return
    ok = True
    if arg.kind == schema.INT:
        if isinstance(value, str):
            _check_ref(value, defined, what, "symint")
        else:
            ok = isinstance(value, int) and not isinstance(value, bool)
    elif arg.kind == schema.INTS:
        ok = isinstance(value, list)
        for item in value if ok else []:
            if isinstance(item, str):
                _check_ref(item, defined, what, "symint")
            elif not isinstance(item, int) or isinstance(item, bool):
                ok = False
    elif arg.kind == schema.FLOAT:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif arg.kind == schema.BOOL:
        ok = isinstance(value, bool)
    elif arg.kind == schema.DTYPE:
        ok = value in schema.DTYPES
    elif arg.kind == schema.STR:
        ok = isinstance(value, str)
    if not ok:
        raise ProgramError(f"{what} must be of kind {arg.kind}, got {value!r}")


def read_safetensors_header(path: Path) -> dict:
    """The JSON header of a safetensors file, checked against the file's real size."""
    if not path.is_file():
        raise WeightsError(f"missing weights file {path}")
    size = path.stat().st_size
    try:
        with path.open("rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise WeightsError(f"{path} is truncated: {size} bytes, not even a header")
            (header_len,) = struct.unpack("<Q", head)
            if header_len > size - 8:
                raise WeightsError(f"{path} is truncated: its header claims {header_len} bytes, the file has {size}")
            header = json.loads(fh.read(header_len))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise WeightsError(f"{path} is not a safetensors file (unreadable header)") from None
    header.pop("__metadata__", None)
    data_end = max((meta["data_offsets"][1] for meta in header.values()), default=0)
    if 8 + header_len + data_end > size:
        raise WeightsError(
            f"{path} is truncated: its tensors need {8 + header_len + data_end} bytes, the file has {size}"
        )
    return header


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
    index = _read_json(index_path)
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise WeightsError(f"{index_path.name} has no weight_map of const names to shard files")
    names = sorted(set(weight_map.values()), key=str)
    for number, name in enumerate(names, start=1):
        if not isinstance(name, str) or name != shard_file_name(number, len(names)):
            raise WeightsError(f"{index_path.name} names {name!r}, which is not a shard of {len(names)} "
                               f"(expected {shard_file_name(1, len(names))} to {shard_file_name(len(names), len(names))})")
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
            raise WeightsError(f"cannot read {consts_file.path}: {exc}") from None
        consts.update(arrays if names is None else {k: v for k, v in arrays.items() if k in names})
    return consts


def _check_consts(spec: dict, files: list[ConstsFile]) -> None:
    where = {name: consts_file for consts_file in files for name in consts_file.header}
    for name, meta in spec["consts"].items():
        consts_file = where.get(name)
        if consts_file is None:
            holder = files[0].path.name if len(files) == 1 else "the consts shards"
            raise WeightsError(f"{holder} lacks the const {name!r} that prog.json declares")
        stored = consts_file.header[name]
        dtype = _ST_DTYPES.get(stored["dtype"], stored["dtype"])
        if dtype != meta["dtype"] or list(stored["shape"]) != list(meta["shape"]):
            raise WeightsError(
                f"const {name!r}: prog.json says {meta['dtype']}{list(meta['shape'])}, "
                f"{consts_file.path.name} holds {dtype}{list(stored['shape'])}"
            )
