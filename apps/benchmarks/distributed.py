"""Split generation's speed and memory per rank: one process against 2 and 3 ranks, in one run.

    python -m apps.benchmarks.distributed --program ~/.cache/paw/programs/smollm2
    python -m apps.benchmarks.distributed --program P --ranks 1,2,3 --modes pipeline,tensor --rounds 2

Each configuration is its own ``mlx.launch -n N --backend ring`` over the loopback address
(one process runs alone, with ``parallel="none"``). Rank 0 times a prompt and greedy
decoding (``apps.benchmarks.worker.time_stream``: the decode rate is 1 / the median gap between
tokens) and reports every rank's check-in: the weight bytes it holds and its resident
memory. Configurations run in interleaved rounds (order reversed each round), each row
keeping its best; ``same tokens`` compares the greedy tokens with the one-process run.

On one machine the ranks share its cores, so more ranks decode slower: the point of
splitting is the memory per rank (a model larger than one Mac), and the table shows
what the split costs. Across Macs each rank has its own cores and memory bandwidth.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS_DIR = Path(__file__).parent / "results"
DOCS_START, DOCS_END = "<!-- distributed-bench:start -->", "<!-- distributed-bench:end -->"
COLUMNS = [("ranks", "processes", "{}"), ("mode", "split", "{}"), ("prefill_tps", "prefill tok/s", "{:.1f}"),
           ("decode_tps", "decode tok/s", "{:.2f}"), ("decode_ratio", "decode / 1 process", "{:.2f}x"),
           ("weights", "weights per rank MB", "{}"), ("share", "largest share of weights", "{:.2f}"),
           ("resident", "resident per rank MB", "{}"), ("same", "same tokens", "{}")]


def worker(out: str, program: str, mode: str, prompt_tokens: int, decode_tokens: int) -> None:
    """One configuration, on every rank; rank 0 (or the only process) writes ``out``."""
    import paw_mlx
    from apps.benchmarks.worker import prompt_ids, time_stream
    from interp.device import resident_bytes
    from interp.distributed.loading import held_bytes
    from interp.generate import generate_step

    start = time.perf_counter()
    prog = paw_mlx.load(program, parallel=mode)  # the other ranks serve inside and exit when rank 0 is done
    load_s = time.perf_counter() - start
    vocab = int(prog.program.model_info.get("vocab_size") or 0)
    ids = prompt_ids(prompt_tokens, vocab)
    list(generate_step(prog.model, ids[:16], prog.make_cache(), max_tokens=4))  # compile and trace first
    result = time_stream(generate_step(prog.model, ids, prog.make_cache(), max_tokens=decode_tokens), decode_tokens)
    ranks = getattr(prog.model, "ranks", None)
    if ranks:
        result["per_rank"] = [{"weights": r.weight_bytes, "resident": r.resident_bytes} for r in ranks]
    else:
        result["per_rank"] = [{"weights": held_bytes(prog.model.consts.values()), "resident": resident_bytes()}]
    result["load_s"] = load_s
    Path(out).write_text(json.dumps(result), encoding="utf-8")


def run_config(program: Path, ranks: int, mode: str, prompt_tokens: int, decode_tokens: int,
               timeout: float) -> dict:
    """One configuration in fresh processes; its row (or an error)."""
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch) / "result.json"
        args = ["-m", "apps.benchmarks.distributed", "worker", str(out), str(program), mode if ranks > 1 else "none",
                str(prompt_tokens), str(decode_tokens)]
        bin_dir = Path(sys.executable).parent
        command = [sys.executable, *args] if ranks == 1 else [
            str(bin_dir / "mlx.launch"), "-n", str(ranks), "--backend", "ring", "--starting-port", str(_free_port()),
            "--python", sys.executable, "--", *args]
        env = dict(os.environ, PYTHONPATH=_with_repo(os.environ.get("PYTHONPATH")))
        start = time.perf_counter()
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
        except subprocess.TimeoutExpired:
            return {"ranks": ranks, "mode": mode, "error": f"timed out after {timeout:g} s"}
        if done.returncode != 0 or not out.is_file():
            return {"ranks": ranks, "mode": mode, "error": (done.stderr.strip().splitlines() or ["failed"])[-1]}
        row = json.loads(out.read_text())
    row.update(ranks=ranks, mode=mode if ranks > 1 else "-", wall_s=time.perf_counter() - start,
               prefill_tps=prompt_tokens / row["ttft_s"])
    return row


def run(program: Path, rank_counts: list[int], modes: list[str], prompt_tokens: int, decode_tokens: int,
        rounds: int, timeout: float, say=print) -> dict:
    from apps.benchmarks.harness import machine

    configs = [(n, m) for n in rank_counts for m in (modes if n > 1 else ["none"])]
    runs: dict[tuple, list[dict]] = {c: [] for c in configs}
    report = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": machine(),
              "config": {"program": str(program), "prompt_tokens": prompt_tokens, "decode_tokens": decode_tokens,
                         "rounds": rounds}}
    for index in range(rounds):
        for ranks, mode in configs if index % 2 == 0 else configs[::-1]:
            say(f"{ranks} process(es), {mode} (round {index + 1}/{rounds})")
            runs[(ranks, mode)].append(run_config(program, ranks, mode, prompt_tokens, decode_tokens, timeout))
    rows = [_best(found) for found in runs.values()]
    _compare(rows)
    report["rows"] = rows
    return report


def _best(found: list[dict]) -> dict:
    failed = [row for row in found if "error" in row]
    if failed:
        return failed[0]
    row = dict(found[0])
    row["decode_tps"] = max(r["decode_tps"] for r in found)
    row["prefill_tps"] = max(r["prefill_tps"] for r in found)
    row["rounds"] = [{"decode_tps": r["decode_tps"], "prefill_tps": r["prefill_tps"]} for r in found]
    return row


def _compare(rows: list[dict]) -> None:
    alone = next((r for r in rows if r.get("ranks") == 1 and "error" not in r), None)
    for row in rows:
        if "error" in row:
            continue
        weights = [r["weights"] for r in row["per_rank"]]
        total = alone["per_rank"][0]["weights"] if alone else sum(weights)
        row["weights"] = " / ".join(f"{w / 1e6:.0f}" for w in weights)
        row["resident"] = " / ".join(f"{r['resident'] / 1e6:.0f}" for r in row["per_rank"])
        row["share"] = max(weights) / total
        if alone:
            row["decode_ratio"] = row["decode_tps"] / alone["decode_tps"]
            row["same"] = "yes" if row["tokens"] == alone["tokens"] else "no"


def markdown(report: dict) -> str:
    m, c = report["machine"], report["config"]
    lines = [f"Run {report['started']} on {m['processor']} ({m['cpus']} CPUs), MLX {m['mlx']} on {m['device']}; "
             f"load average at start {', '.join(f'{x:.1f}' for x in m.get('load_average', []))}.",
             f"Program `{c['program']}`; prompt {c['prompt_tokens']} tokens, {c['decode_tokens']} decoded greedily; "
             f"ranks over MLX's ring backend on the loopback address; best of {c['rounds']} interleaved round(s).",
             "", "| " + " | ".join(h for _, h, _ in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in report["rows"]:
        if "error" in row:
            lines.append(f"| {row['ranks']} | {row['mode']} | error: {row['error']} |" + " |" * (len(COLUMNS) - 3))
            continue
        lines.append("| " + " | ".join(fmt.format(row[key]) if row.get(key) is not None else "-"
                                        for key, _, fmt in COLUMNS) + " |")
    return "\n".join(lines) + "\n"


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _with_repo(pythonpath: str | None) -> str:
    repo = str(Path(__file__).resolve().parents[2])
    return repo if not pythonpath else f"{repo}{os.pathsep}{pythonpath}"


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "worker":
        out, program, mode, prompt_tokens, decode_tokens = argv[1:6]
        worker(out, program, mode, int(prompt_tokens), int(decode_tokens))
        return
    parser = argparse.ArgumentParser(prog="python -m apps.benchmarks.distributed", description=__doc__.split("\n\n")[0])
    parser.add_argument("--program", type=Path, default=Path.home() / ".cache/paw/programs/smollm2",
                        help="Program directory (default: paw's cached smollm2).")
    parser.add_argument("--ranks", default="1,2,3", help="Process counts, comma-separated.")
    parser.add_argument("--modes", default="pipeline,tensor", help="Splits to measure for more than one process.")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=900, help="Seconds one configuration may take.")
    parser.add_argument("--results", type=Path, default=RESULTS_DIR)
    parser.add_argument("--docs", type=Path, default=None,
                        help="Also rewrite the table between the distributed-bench markers of this page "
                             "(docs/distributed.md).")
    args = parser.parse_args(argv)
    report = run(args.program, [int(n) for n in args.ranks.split(",")], args.modes.split(","), args.prompt_tokens,
                 args.decode_tokens, args.rounds, args.timeout, say=lambda msg: print(f"  {msg}", file=sys.stderr))
    text = markdown(report)
    print(text)
    args.results.mkdir(parents=True, exist_ok=True)
    stamp = report["started"].replace(" ", "_").replace(":", "")
    for name, content in ((f"distributed-{stamp}.json", json.dumps(report, indent=1) + "\n"),
                          (f"distributed-{stamp}.md", text), ("distributed-latest.md", text)):
        (args.results / name).write_text(content, encoding="utf-8")
    if args.docs is not None:
        from interp.docblock import replace_block

        replace_block(args.docs, DOCS_START, DOCS_END, text)


if __name__ == "__main__":
    main()
