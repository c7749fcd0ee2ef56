"""``paw inspect``: a program's shape at a glance, from prog.json and the consts headers, and the memory it needs."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from rich.console import Console
from rich.table import Table

from interp.errors import ProgramError
from interp.program import read_program

_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "int64": 8, "int32": 4, "int16": 2, "int8": 1,
          "uint32": 4, "uint16": 2, "uint8": 1, "bool": 1}


def program_summary(path: str | Path, verify: bool = False, context: int | None = None, batch: int = 1) -> dict:
    """Numbers shown by ``paw inspect`` (also used by tests).

    ``context``: positions for the memory estimate (default: the model's context length).
    """
    from interp.memory import estimate_memory

    program = read_program(path)
    ops = Counter(node.op for node in program.nodes)
    params = 0
    by_dtype: Counter = Counter()
    for meta in program.spec["consts"].values():
        count = 1
        for dim in meta["shape"]:
            count *= dim
        params += count
        by_dtype[meta["dtype"]] += count * _BYTES[meta["dtype"]]
    summary = {
        "path": str(program.directory),
        "format": f"{program.spec['format']} v{program.spec['version']}",
        "model": program.model_info,
        "nodes": len(program.nodes),
        "ops": dict(ops.most_common()),
        "parameters": params,
        "bytes_by_dtype": dict(by_dtype),
        "tensors": sum(len(f.header) for f in program.consts_files),
        "consts_files": len(program.consts_files),
        "layers": program.num_layers,
        "fingerprint": program.fingerprint or "(no manifest)",
    }
    if context is not None and context < 1:
        raise ProgramError(f"--context must be at least 1 position, not {context}")
    if batch < 1:
        raise ProgramError(f"--batch must be at least 1, not {batch}")
    positions = context or int(program.model_info.get("context_length") or 4096)
    summary["memory"] = estimate_memory(program, positions, batch)
    if verify:
        summary["verified"] = verify_files(program.directory, program.manifest)
    return summary


def verify_files(directory: Path, manifest: dict) -> int:
    from hashlib import sha256

    files = manifest.get("files")
    if not files:
        raise ProgramError(f"{directory} has no manifest with file hashes to verify")
    for name, expected in files.items():
        digest = sha256()
        path = directory / name
        if not path.is_file():
            raise ProgramError(f"{path} is listed in the manifest but missing")
        with path.open("rb") as fh:
            while block := fh.read(1 << 22):
                digest.update(block)
        if digest.hexdigest() != expected:
            raise ProgramError(f"{path} does not match its sha256 in manifest.json (modified or corrupt)")
    return len(files)


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000:
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.1f} TB"


def show_program(path: str | Path, verify: bool = False, context: int | None = None, batch: int = 1) -> None:
    s = program_summary(path, verify=verify, context=context, batch=batch)
    console = Console()
    model = s["model"]
    console.print(f"[bold]{s['path']}[/bold]  ({s['format']})")
    console.print(f"model: {model.get('architecture', '?')} ({model.get('model_type', '?')}), dtype {model.get('dtype')}, "
                  f"context {model.get('context_length')}, vocab {model.get('vocab_size')}")
    shards = f" in {s['consts_files']} shards" if s["consts_files"] > 1 else ""
    console.print(f"parameters: {s['parameters']:,} in {s['tensors']} tensors{shards}; {s['layers']} attention layers; "
                  f"{s['nodes']} nodes")
    console.print(f"fingerprint: {s['fingerprint']}" + (f" (verified {s['verified']} files)" if verify else ""))
    sizes = Table(title="bytes by dtype", show_header=True)
    sizes.add_column("dtype")
    sizes.add_column("bytes", justify="right")
    for dtype, nbytes in sorted(s["bytes_by_dtype"].items()):
        sizes.add_row(dtype, _human(nbytes))
    console.print(sizes)
    ops = Table(title="ops", show_header=True)
    ops.add_column("op")
    ops.add_column("count", justify="right")
    for op, count in s["ops"].items():
        ops.add_row(op, str(count))
    console.print(ops)
    memory = s["memory"]
    console.print(f"memory to run: {_human(memory.total)} with {memory.context:,} positions of context "
                  f"(batch {memory.batch})")
    need = Table(show_header=True)
    need.add_column("what")
    need.add_column("dtype")
    need.add_column("bytes", justify="right")
    for dtype, nbytes in sorted(memory.weights_by_dtype.items()):
        need.add_row("weights", dtype, _human(nbytes))
    for dtype, nbytes in sorted(memory.cache_by_dtype.items()):
        need.add_row("KV cache", dtype, _human(nbytes))
    need.add_row("[bold]total[/bold]", "", f"[bold]{_human(memory.total)}[/bold]")
    console.print(need)
