"""``paw inspect``: a program's shape at a glance, from prog.json and the consts headers, and
the memory it needs (or, for a compiled program, its spec, base and prefix)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from rich.console import Console
from rich.table import Table

from interp.errors import ProgramError
from interp.limits import dtype_bytes, human_bytes
from interp.manifest import verify_manifest
from interp.program import PROGRAM_FILE, read_program
from interp.tokenizer import TOKENIZER_FILES


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
        by_dtype[meta["dtype"]] += count * dtype_bytes(meta["dtype"])
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
        "recurrent_states": program.recurrent_states,
        "fingerprint": program.fingerprint or "(no manifest)",
    }
    if context is not None and context < 1:
        raise ProgramError(f"--context must be at least 1 position, not {context}")
    if batch < 1:
        raise ProgramError(f"--batch must be at least 1, not {batch}")
    positions = context or int(program.model_info.get("context_length") or 4096)
    summary["memory"] = estimate_memory(program, positions, batch)
    if verify:
        summary["verified"] = verify_manifest(program.directory, program.manifest, program.defining_files,
                                              TOKENIZER_FILES)
    return summary


def artifact_summary(path: str | Path, verify: bool = False) -> dict:
    """What ``paw inspect`` shows of a compiled program (``paw compile``)."""
    from paw_mlx.programs.artifact import read_artifact

    artifact = read_artifact(path, verify=verify)
    keys = artifact.prefix[0][0]
    summary = {
        "path": str(artifact.directory),
        "spec": artifact.spec,
        "base": f"{artifact.base_fingerprint} ({artifact.base_hint or 'path unknown'})",
        "prefix_tokens": artifact.prefix_length,
        "layers": len(artifact.prefix),
        "prefix": f"{keys.shape[1]} KV heads x {keys.shape[3]}, {str(keys.dtype).removeprefix('mlx.core.')}",
        "demos": len(artifact.demos),
        "tuning": (artifact.tuning or {}).get("method", "none"),
        "adapter": artifact.adapter.summary() if artifact.adapter is not None else None,
        "returns": artifact.returns,
        "copy_rule": artifact.copy_rule.describe() if artifact.copy_rule is not None else None,
        "kept": (artifact.selection or {}).get("kept"),
    }
    if verify:
        summary["verified"] = True
    return summary


def _is_compiled_program(path: Path) -> bool:
    from paw_mlx.programs.artifact import ARTIFACT_FILE

    path = path.expanduser()
    return path.name == ARTIFACT_FILE or ((path / ARTIFACT_FILE).is_file() and not (path / PROGRAM_FILE).is_file())


def show_program(path: str | Path, verify: bool = False, context: int | None = None, batch: int = 1) -> None:
    if _is_compiled_program(Path(path)):
        show_artifact(path, verify)
        return
    s = program_summary(path, verify=verify, context=context, batch=batch)
    console = Console()
    model = s["model"]
    console.print(f"[bold]{s['path']}[/bold]  ({s['format']})")
    console.print(f"model: {model.get('architecture', '?')} ({model.get('model_type', '?')}), "
                  f"dtype {model.get('dtype')}, "
                  f"context {model.get('context_length')}, vocab {model.get('vocab_size')}")
    shards = f" in {s['consts_files']} shards" if s["consts_files"] > 1 else ""
    kinds = ", ".join(f"{count} {kind.upper() if kind in ('ssm', 'lru') else kind} layers"
                      for kind, count in s["recurrent_states"].items())
    conv = f"{kinds} (recurrent state); " if kinds else ""
    console.print(f"parameters: {s['parameters']:,} in {s['tensors']} tensors{shards}; {s['layers']} attention layers; "
                  f"{conv}{s['nodes']} nodes")
    console.print(f"fingerprint: {s['fingerprint']}" + (f" (verified {s['verified']} files)" if verify else ""))
    sizes = Table(title="bytes by dtype", show_header=True)
    sizes.add_column("dtype")
    sizes.add_column("bytes", justify="right")
    for dtype, nbytes in sorted(s["bytes_by_dtype"].items()):
        sizes.add_row(dtype, human_bytes(nbytes))
    console.print(sizes)
    ops = Table(title="ops", show_header=True)
    ops.add_column("op")
    ops.add_column("count", justify="right")
    for op, count in s["ops"].items():
        ops.add_row(op, str(count))
    console.print(ops)
    memory = s["memory"]
    console.print(f"memory to run: {human_bytes(memory.total)} with {memory.context:,} positions of context "
                  f"(batch {memory.batch})")
    need = Table(show_header=True)
    need.add_column("what")
    need.add_column("dtype")
    need.add_column("bytes", justify="right")
    for dtype, nbytes in sorted(memory.weights_by_dtype.items()):
        need.add_row("weights", dtype, human_bytes(nbytes))
    for dtype, nbytes in sorted(memory.cache_by_dtype.items()):
        need.add_row("KV cache", dtype, human_bytes(nbytes))
    for dtype, nbytes in sorted(memory.recurrent_by_dtype.items()):
        need.add_row("recurrent state", dtype, human_bytes(nbytes))
    need.add_row("[bold]total[/bold]", "", f"[bold]{human_bytes(memory.total)}[/bold]")
    console.print(need)


def show_artifact(path: str | Path, verify: bool = False) -> None:
    s = artifact_summary(path, verify=verify)
    console = Console()
    console.print(f"[bold]{s['path']}[/bold]  (compiled program)")
    spec = s["spec"].strip().splitlines()[0] if s["spec"].strip() else ""
    console.print(f"spec: {spec[:100]}{'...' if len(spec) > 100 or len(s['spec'].strip().splitlines()) > 1 else ''}",
                  markup=False)
    console.print(f"base model: {s['base']}", markup=False)
    console.print(f"prefix: {s['prefix_tokens']} tokens in {s['layers']} layers, {s['prefix']}")
    console.print(describe_contents(s), markup=False)
    if verify:
        console.print("verified: every file matches manifest.json")


def describe_contents(summary: dict) -> str:
    """One line of what a compiled program holds beside its spec: the candidate the compiler
    kept, its demonstrations, tuning, adapter and output constraint."""
    adapter, returns = summary["adapter"], summary["returns"]
    parts = [f"{summary['demos']} demonstration{'s' if summary['demos'] != 1 else ''} in the prefix",
             f"tuning: {summary['tuning']}",
             f"adapter: LoRA rank {adapter['rank']} on {adapter['modules']} modules" if adapter else "adapter: none",
             f"output constraint: {json.dumps(returns)}" if returns else "output constraint: none"]
    if summary.get("copy_rule"):
        parts.append(f"each output {summary['copy_rule']} (copy rule)")
    kept = f"kept candidate: {summary['kept']}; " if summary["kept"] else ""
    return kept + "; ".join(parts)
