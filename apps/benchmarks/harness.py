"""Plan a benchmark run, run every engine in its own process, and report the table.

Variants (``--dtypes``): ``float32``, ``bfloat16`` and ``q4`` (4-bit affine weights in
groups of 64 over float32, for paw and mlx-lm alike; transformers has no CPU
equivalent and runs only the float variants). Engines (``--engines``):

- ``paw``: paw's interpreter (fused program, compiled decode)
- ``paw-nocompile``: the same program with decode compilation off
- ``paw-nofuse``: a program exported with ``--no-fuse``, decode compilation off
- ``mlx-lm``: ``mlx_lm.convert`` of the same weights, run by mlx-lm's ``generate_step``
- ``transformers``: transformers eager (torch, CPU)
- ``ceiling``: MLX matvec over exactly the weights a decoded token reads (a bound, not a model)
- ``export``: ``paw export llama`` of the source itself (``smollm2``: the GGUF), timed as a
  user runs it, from a new process to the finished program
- ``paw-stock``, ``mlx-lm-stock``, ``ceiling-stock``: paw, mlx-lm and the ceiling on the
  BLAS bundled in MLX's Linux wheel (``PAW_BLAS=reference``), which is what plain mlx-lm
  gets there; every other MLX engine runs on the OpenBLAS that ``interp.blas`` puts under
  MLX (see ``machine.blas``)

``device`` (``--device``) says where the MLX engines compute: ``auto`` (MLX's default:
the GPU on a Mac or with MLX's CUDA backend, else the CPU), ``cpu`` or ``gpu``.
transformers always runs on torch's CPU, so it is not among a GPU run's default engines.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from apps.benchmarks import prepare
from interp.docblock import replace_block
from interp.paths import DEFAULT_MODEL

VARIANTS = {"float32": ("float32", 0), "bfloat16": ("bfloat16", 0), "q4": ("float32", 4)}
ENGINES = ("paw", "paw-nocompile", "paw-nofuse", "paw-stock", "mlx-lm", "mlx-lm-stock", "transformers", "ceiling",
           "ceiling-stock", "export")
STOCK_BLAS = ("paw-stock", "mlx-lm-stock", "ceiling-stock")
DEFAULT_ENGINES = ("paw", "mlx-lm", "transformers", "ceiling", "export")
GPU_DEFAULT_ENGINES = ("paw", "mlx-lm", "ceiling", "export")  # transformers (torch's CPU build) left out
RESULTS_DIR = Path(__file__).parent / "results"
RESULT_TAG = "PAW-BENCH-RESULT "

Say = Callable[[str], None]


@dataclass
class BenchConfig:
    src: str = DEFAULT_MODEL
    dtypes: list[str] = field(default_factory=lambda: list(VARIANTS))
    engines: list[str] = field(default_factory=lambda: list(DEFAULT_ENGINES))
    prompt_tokens: int = 512
    decode_tokens: int = 256
    group_size: int = 64
    programs: dict[str, str] = field(default_factory=dict)  # variant -> existing paw program
    timeout_s: float = 3600.0
    results_dir: Path = RESULTS_DIR
    #: every engine runs this many times, the order reversed each round; each row keeps the
    #: best of its rounds (see ``best_of``), so a neighbour's burst on a shared machine does
    #: not decide a ratio
    rounds: int = 2
    device: str = "auto"  # where MLX engines compute: auto (MLX's default), cpu or gpu


def default_engines(device_name: str) -> list[str]:
    """The engines a run on ``device_name`` measures unless told otherwise."""
    from interp import device

    device.use_device(device_name)
    return list(DEFAULT_ENGINES if device.on_cpu() else GPU_DEFAULT_ENGINES)


def machine(device_name: str = "auto") -> dict:
    """Where the numbers come from (MLX engines on ``device_name``)."""
    from interp import blas, device

    device.use_device(device_name)
    info = {"platform": platform.platform(), "machine": platform.machine(), "processor": _cpu_name(),
            "cpus": os.cpu_count(), "python": platform.python_version(), "mlx": _version("mlx"),
            "mlx_lm": _version("mlx-lm"), "torch": _version("torch"), "transformers": _version("transformers"),
            "device": device.backend(), "device_description": device.describe(), "metal": device.has_metal(),
            "blas": blas.status(), "tf32": device.float32_in_tf32()}
    try:
        info["load_average"] = list(os.getloadavg())
    except OSError:
        pass
    return info


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"


def run_engine(engine: str, path: Path, dtype: str, config: BenchConfig) -> dict:
    """Start one worker process and return its parsed result (or an error record)."""
    worker_engine = "paw" if engine.startswith("paw") else engine.removesuffix("-stock")
    cmd = [sys.executable, "-m", "apps.benchmarks.worker", "--engine", worker_engine, "--path", str(path),
           "--dtype", dtype, "--prompt-tokens", str(config.prompt_tokens),
           "--decode-tokens", str(config.decode_tokens), "--device", config.device]
    if engine in ("paw-nocompile", "paw-nofuse"):
        cmd.append("--no-compile")
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    if engine in STOCK_BLAS:
        env["PAW_BLAS"] = "reference"
    env["PYTHONPATH"] = _with_repo_on_path(env.get("PYTHONPATH"))
    start = time.perf_counter()
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=config.timeout_s, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {config.timeout_s:.0f} s"}
    for line in done.stdout.splitlines():
        if line.startswith(RESULT_TAG):
            result = json.loads(line[len(RESULT_TAG):])
            result["wall_s"] = time.perf_counter() - start
            return result
    tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
    return {"error": f"exit {done.returncode}: {tail[:300]}"}


def run_export(variant: str, config: BenchConfig, root: Path) -> dict:
    """Time ``paw export llama SRC`` in the variant's dtype and quantization, as a user runs it.

    The program is written to a scratch folder under the bench cache and removed after:
    only the time (interpreter start, imports and the export itself) and its size are kept.
    """
    dtype, bits = VARIANTS[variant]
    root.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".export-", dir=root))
    out = scratch / "program"
    cmd = [sys.executable, "-m", "apps.cli", "export", "llama", config.src, "-o", str(out), "--dtype", dtype]
    if bits:
        cmd += ["--quantize", str(bits), "--group-size", str(config.group_size)]
    env = dict(os.environ, PYTHONPATH=_with_repo_on_path(os.environ.get("PYTHONPATH")))
    try:
        start = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=config.timeout_s, env=env)
        seconds = time.perf_counter() - start
        if done.returncode != 0:
            tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
            return {"error": f"exit {done.returncode}: {tail[:300]}"}
        size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
        return {"export_s": seconds, "program_gb": size / 1e9}
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {config.timeout_s:.0f} s"}
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _with_repo_on_path(pythonpath: str | None) -> str:
    root = str(Path(__file__).resolve().parents[2])
    return root + os.pathsep + pythonpath if pythonpath else root


def _paths(variant: str, engine: str, config: BenchConfig, root: Path, hf: Path, say: Say) -> Path | None:
    dtype, bits = VARIANTS[variant]
    if engine == "export":
        return root  # exports config.src itself, see run_export
    if engine == "transformers":
        return hf if not bits else None
    if engine.startswith("mlx-lm"):
        return prepare.mlx_lm_model(hf, root, dtype, bits, config.group_size, say)
    if engine == "paw-nofuse":
        return prepare.paw_program(hf, root, dtype, bits, config.group_size, say, fuse=False)
    if variant in config.programs:
        return Path(config.programs[variant])
    return prepare.paw_program(hf, root, dtype, bits, config.group_size, say)


def run_bench(config: BenchConfig, say: Say = print) -> dict:
    """Prepare every engine's weights, measure each engine, and return the report."""
    unknown = [d for d in config.dtypes if d not in VARIANTS] + [e for e in config.engines if e not in ENGINES]
    if unknown:
        raise ValueError(f"unknown dtype or engine: {', '.join(unknown)}")
    described = machine(config.device)  # before any heavy work: says so if there is no such device
    root = prepare.bench_dir() / prepare.source_key(config.src)
    hf = prepare.hf_folder(config.src, root, say)
    report = {"config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(config).items()},
              "machine": described, "started": time.strftime("%Y-%m-%d %H:%M:%S"), "rows": []}
    if config.rounds < 1:
        raise ValueError(f"rounds must be at least 1, got {config.rounds}")
    for variant in config.dtypes:
        dtype = VARIANTS[variant][0]
        paths = {e: _paths(variant, e, config, root, hf, say) for e in config.engines}
        # the ceiling reads the weights of the paw program being measured
        ceiling_path = paths.get("paw") or paths.get("paw-nocompile") or paths.get("paw-nofuse")
        engines = [e for e in config.engines if paths[e] is not None]
        runs: dict[str, list[dict]] = {e: [] for e in engines}
        for round_index in range(config.rounds):
            for engine in engines if round_index % 2 == 0 else engines[::-1]:
                say(f"{variant}: {engine} (round {round_index + 1}/{config.rounds})")
                if engine == "export":
                    runs[engine].append(run_export(variant, config, root))
                    continue
                path = (ceiling_path or paths[engine]) if engine.startswith("ceiling") else paths[engine]
                runs[engine].append(run_engine(engine, path, dtype, config))
        report["rows"] += [{"dtype": variant, "engine": e, **best_of(runs[e])} for e in engines]
    report["machine"]["load_average_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    _add_ratios(report["rows"])
    return report


# How rounds combine: the fastest prefill and decode, the quickest load, the largest memory.
_BEST = {"decode_tps": max, "seconds_per_token": min, "ttft_s": min, "decode_s": min, "load_s": min,
         "peak_memory_gb": max, "max_rss_gb": max, "gb_per_s": max, "wall_s": min, "export_s": min}


def best_of(runs: list[dict]) -> dict:
    """One row from an engine's rounds: each timing at its best, memory at its worst.

    Taking the best of interleaved rounds is timeit's rule: interference from other work
    only ever slows a run down. Every round's timings stay in ``rounds``; a round that
    failed makes the row an error, since a flaky engine should not look fine.
    """
    failed = [run for run in runs if "error" in run]
    if failed:
        return failed[0]
    row = dict(runs[0])
    for key, pick in _BEST.items():
        if key in row:
            row[key] = pick(run[key] for run in runs)
    row["rounds"] = [{k: run[k] for k in ("ttft_s", "decode_tps", "export_s") if k in run} for run in runs]
    if any(run.get("tokens") != row.get("tokens") for run in runs):
        row["tokens_differ_between_rounds"] = True
    return row


def _add_ratios(rows: list[dict]) -> None:
    """paw-vs-mlx-lm ratios and decode as a fraction of the matvec ceiling, per dtype.

    Each row is held against the mlx-lm and ceiling of its own BLAS: stock-BLAS rows against
    ``mlx-lm-stock`` and ``ceiling-stock``, the others against those on paw's OpenBLAS.
    """
    by = {(r["dtype"], r["engine"]): r for r in rows}
    for row in rows:
        stock = row["engine"] in STOCK_BLAS  # compared with mlx-lm on the same (bundled) BLAS
        ref = by.get((row["dtype"], "mlx-lm-stock" if stock else "mlx-lm"))
        ceiling = by.get((row["dtype"], "ceiling-stock" if stock else "ceiling"))
        if "error" in row or "ttft_s" not in row:  # the ceiling and export rows hold no generation
            continue
        if ref and "error" not in ref and ref is not row:
            row["decode_vs_mlx_lm"] = row["decode_tps"] / ref["decode_tps"]
            row["prefill_vs_mlx_lm"] = ref["ttft_s"] / row["ttft_s"]
            row["memory_vs_mlx_lm"] = row["peak_memory_gb"] / ref["peak_memory_gb"]
            if "tokens" in row:
                same = 0
                for a, b in zip(row["tokens"], ref["tokens"], strict=False):
                    if a != b:
                        break
                    same += 1
                row["same_tokens_as_mlx_lm"] = same
        if ceiling and "error" not in ceiling:
            row["decode_vs_ceiling"] = row["decode_tps"] / ceiling["decode_tps"]


COLUMNS = [  # (key, header, format)
    ("dtype", "dtype", "{}"), ("engine", "engine", "{}"), ("load_s", "load s", "{:.2f}"),
    ("ttft_s", "TTFT s", "{:.2f}"), ("prefill_tps", "prefill tok/s", "{:.1f}"),
    ("decode_tps", "decode tok/s", "{:.2f}"), ("peak_memory_gb", "peak mem GB", "{:.3f}"),
    ("decode_vs_mlx_lm", "decode / mlx-lm", "{:.2f}x"), ("prefill_vs_mlx_lm", "prefill / mlx-lm", "{:.2f}x"),
    ("memory_vs_mlx_lm", "mem / mlx-lm", "{:.2f}x"), ("decode_vs_ceiling", "decode / ceiling", "{:.2f}"),
    ("same_tokens_as_mlx_lm", "same tokens", "{}"), ("export_s", "export s", "{:.1f}"),
]


def table_cells(report: dict) -> list[list[str]]:
    prompt = report["config"]["prompt_tokens"]
    cells = []
    for row in report["rows"]:
        row = dict(row)
        if "ttft_s" in row:
            row["prefill_tps"] = prompt / row["ttft_s"]
        if "error" in row:
            cells.append([row["dtype"], row["engine"], "error: " + row["error"]] + [""] * (len(COLUMNS) - 3))
            continue
        cells.append([fmt.format(row[key]) if row.get(key) is not None else "-" for key, _, fmt in COLUMNS])
    return cells


def markdown(report: dict) -> str:
    m, c = report["machine"], report["config"]
    lines = [f"Run {report['started']} on {m['processor']} ({m['cpus']} CPUs, {m['machine']}), "
             f"MLX {m['mlx']} on {m.get('device_description', m['device'])}"
             f"{', BLAS under MLX: ' + m['blas'] if m.get('blas') and m['device'] == 'cpu' else ''}"
             f"{', float32 products in TF32' if m.get('tf32') and m['device'] != 'cpu' else ''}, "
             f"mlx-lm {m['mlx_lm']}, "
             f"torch {m['torch']}, transformers {m['transformers']}; load average at start "
             f"{', '.join(f'{x:.1f}' for x in m.get('load_average', []))}.",
             f"Prompt {c['prompt_tokens']} tokens, {c['decode_tokens']} tokens decoded greedily; "
             f"source `{c['src']}`; best of {c.get('rounds', 1)} interleaved round(s) per engine.", "",
             "| " + " | ".join(h for _, h, _ in COLUMNS) + " |",
             "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(row) + " |" for row in table_cells(report)]
    return "\n".join(lines) + "\n"


def print_table(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="paw bench")
    for _, header, _ in COLUMNS:
        table.add_column(header, justify="left" if header in ("dtype", "engine") else "right")
    for row in table_cells(report):
        table.add_row(*row)
    Console().print(table)


def write_results(report: dict, directory: Path, docs: Path | None = None) -> tuple[Path, Path]:
    """results/bench-<time>.json and .md, plus latest.json/latest.md; optionally the docs page's table.

    A GPU run's files carry its backend (``bench-<time>-metal.json``, ``latest-cuda.md``), so
    runs on a Mac or an NVIDIA GPU never replace the CPU's latest results.
    """
    directory.mkdir(parents=True, exist_ok=True)
    stamp = report["started"].replace(" ", "_").replace(":", "")
    backend = report["machine"].get("device", "cpu")
    suffix = "" if backend == "cpu" else f"-{backend}"
    text = markdown(report)
    json_path, md_path = directory / f"bench-{stamp}{suffix}.json", directory / f"bench-{stamp}{suffix}.md"
    for path, content in ((json_path, json.dumps(report, indent=1) + "\n"), (md_path, text)):
        path.write_text(content, encoding="utf-8")
        (directory / f"latest{suffix}{path.suffix}").write_text(content, encoding="utf-8")
    if docs is not None:
        update_docs(docs, text)
    return json_path, md_path


START, END = "<!-- bench:start -->", "<!-- bench:end -->"


def update_docs(path: Path, table: str) -> None:
    """Replace the text between the bench markers of a markdown page with the table."""
    replace_block(path, START, END, table)
