"""``paw serve`` against ``mlx_lm.server`` on the same weights: 1, 4, 16 and 64 concurrent clients.

    python -m apps.benchmarks.serve_bench                    # smollm2, float32; both servers
    python -m apps.benchmarks.serve_bench --clients 1,16 --max-tokens 32 --docs docs/benchmarks.md

Both servers run as their own processes on loopback ports, each on the OpenBLAS that
``interp.blas`` puts under MLX (mlx-lm's server is started from a Python that imports
``interp`` first: on MLX's bundled reference BLAS it would be 4-60x slower, which is not
the comparison this makes). paw serves ``paw export`` of the Hugging Face folder that
``mlx_lm.convert`` converts (``apps/benchmarks/prepare.py``), so both hold the same numbers.

Each client streams chat completions one after another (greedy, the same prompts in the
same order for both servers) until every client has sent ``--requests-per-client``.
Per level and server: aggregate tokens/s (completion tokens over the level's wall time,
ramp-up and drain included), tokens/s while every client was streaming (from the last
client's first token to the first client's last token), p50 and p95 time to first token,
p95 inter-token latency (gap between streamed tokens), and errors. Levels alternate which
server goes first. The single-stream decode rate is
paw's median, over its one-client requests, of (tokens - 1) / (last token - first token).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from interp.paths import DEFAULT_MODEL

RESULTS = Path(__file__).parent / "results"
QUESTIONS = [
    "What is the capital of France?", "Name three primary colors.", "Write one sentence about the sea.",
    "Explain what a CPU does in two sentences.", "Give me a short recipe for pancakes.",
    "Why is the sky blue?", "List four animals that live in the ocean.", "What is 12 times 13?",
    "Describe a cat to someone who has never seen one.", "Write a haiku about autumn.",
    "What are the benefits of exercise?", "How do plants make food?", "Tell me a fun fact about space.",
    "What is the difference between weather and climate?", "Suggest a name for a bakery.",
    "Summarise the story of Cinderella in three sentences.",
]


@dataclass
class Level:
    server: str
    clients: int
    requests: int = 0
    errors: int = 0
    tokens: int = 0
    seconds: float = 0.0
    ttft: list[float] = field(default_factory=list)
    gaps: list[float] = field(default_factory=list)
    decode_rates: list[float] = field(default_factory=list)  # per request: tokens after the first / their time
    stamps: list[float] = field(default_factory=list)  # every streamed token's arrival
    first_token: dict[int, float] = field(default_factory=dict)  # per client: its first token
    last_token: dict[int, float] = field(default_factory=dict)  # per client: its last token

    def steady_tokens_per_s(self) -> float:
        """Tokens/s while every client was streaming: from the last client's first token to the
        first client's last token (ramp-up and drain left out)."""
        if len(self.first_token) < self.clients:
            return 0.0
        start, end = max(self.first_token.values()), min(self.last_token.values())
        inside = sum(1 for t in self.stamps if start <= t <= end)
        return inside / (end - start) if end > start and inside > 1 else 0.0

    def summary(self) -> dict:
        return {"server": self.server, "clients": self.clients, "requests": self.requests, "errors": self.errors,
                "tokens": self.tokens, "seconds": round(self.seconds, 2),
                "tokens_per_s": round(self.tokens / self.seconds, 2) if self.seconds else 0.0,
                "ttft_p50_s": _pct(self.ttft, 50), "ttft_p95_s": _pct(self.ttft, 95),
                "itl_p50_s": _pct(self.gaps, 50), "itl_p95_s": _pct(self.gaps, 95),
                "decode_tps_p50": _pct(self.decode_rates, 50),
                "steady_tokens_per_s": round(self.steady_tokens_per_s(), 2)}


def _pct(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))], 4)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------- servers


class Server:
    """A server process on a loopback port, started and stopped by the benchmark."""

    def __init__(self, name: str, argv: list[str], port: int, log: Path):
        self.name, self.port = name, port
        self.url = f"http://127.0.0.1:{port}"
        self._log = open(log, "w")  # noqa: SIM115 - kept open for the process's life
        env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
        self.process = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT, env=env)

    def wait_ready(self, health: str, timeout: float = 300.0) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.process.returncode}; see {self._log.name}")
            try:
                if httpx.get(self.url + health, timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"{self.name} did not start within {timeout} s")

    def rss_bytes(self) -> int:
        try:
            fields = Path(f"/proc/{self.process.pid}/status").read_text().split("VmRSS:")[1].split()
            return int(fields[0]) * 1024
        except (OSError, IndexError):
            return 0

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)
        self._log.close()


def start_paw(program: Path, port: int, rows: int, log: Path) -> Server:
    argv = [sys.executable, "-m", "apps.cli", "serve", str(program), "--port", str(port), "--max-rows", str(rows),
            "--max-queue", "1024", "--log-level", "warning"]
    return Server("paw", argv, port, log)


def start_mlx_lm(model: Path, port: int, rows: int, log: Path) -> Server:
    # interp first: it puts OpenBLAS under MLX before mlx.core loads (as every paw process has)
    code = "import sys, interp; from mlx_lm.server import main; sys.argv[0] = 'mlx_lm.server'; main()"
    argv = [sys.executable, "-c", code, "--model", str(model), "--port", str(port), "--decode-concurrency", str(rows),
            "--log-level", "WARNING"]
    return Server("mlx-lm", argv, port, log)


# ---------------------------------------------------------------------- clients


async def one_request(client, url: str, model: str, question: str, max_tokens: int, level: Level,
                      index: int = 0) -> None:
    body = {"model": model, "messages": [{"role": "user", "content": question}], "max_tokens": max_tokens,
            "temperature": 0.0, "stream": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    stamps: list[float] = []
    usage = None
    try:
        async with client.stream("POST", url + "/v1/chat/completions", json=body) as response:
            if response.status_code != 200:
                await response.aread()
                level.errors += 1
                return
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    usage = chunk["usage"]
                for choice in chunk.get("choices") or []:
                    if (choice.get("delta") or {}).get("content"):
                        stamps.append(time.perf_counter())
    except Exception:  # a dropped connection counts as an error of the server under test
        level.errors += 1
        return
    level.requests += 1
    tokens = usage["completion_tokens"] if usage else len(stamps)
    level.tokens += tokens
    if stamps:
        level.ttft.append(stamps[0] - start)
        level.gaps.extend(b - a for a, b in zip(stamps, stamps[1:], strict=False))
        if tokens > 1 and stamps[-1] > stamps[0]:
            level.decode_rates.append((tokens - 1) / (stamps[-1] - stamps[0]))
        level.stamps.extend(stamps)
        level.first_token.setdefault(index, stamps[0])
        level.last_token[index] = stamps[-1]


async def run_level(server: Server, model: str, clients: int, per_client: int, max_tokens: int) -> Level:
    import httpx

    level = Level(server.name, clients)
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(900.0), limits=limits) as client:
        async def worker(index: int) -> None:
            for k in range(per_client):
                question = QUESTIONS[(index * per_client + k) % len(QUESTIONS)]
                await one_request(client, server.url, model, question, max_tokens, level, index)

        start = time.perf_counter()
        await asyncio.gather(*(worker(i) for i in range(clients)))
        level.seconds = time.perf_counter() - start
    return level


# ---------------------------------------------------------------------- report


def table(levels: list[dict], single_stream: float) -> str:
    head = ("| clients | server | requests | errors | tokens/s | vs mlx-lm | vs paw single stream "
            "| tokens/s, all clients streaming | vs paw single stream | TTFT p50 s | TTFT p95 s | ITL p95 s |")
    lines = [head, "|" + "---|" * 12]
    by_key = {(r["server"], r["clients"]): r for r in levels}
    for row in levels:
        other = by_key.get(("mlx-lm", row["clients"]))
        ratio = f"{row['tokens_per_s'] / other['tokens_per_s']:.2f}x" if (
            row["server"] == "paw" and other and other["tokens_per_s"]) else "-"
        single = f"{row['tokens_per_s'] / single_stream:.2f}x" if row["server"] == "paw" and single_stream else "-"
        steady = row["steady_tokens_per_s"]
        steady_ratio = f"{steady / single_stream:.2f}x" if row["server"] == "paw" and single_stream and steady else "-"
        lines.append(f"| {row['clients']} | {row['server']} | {row['requests']} | {row['errors']} | "
                     f"{row['tokens_per_s']:.1f} | {ratio} | {single} | {steady:.1f} | {steady_ratio} | "
                     f"{row['ttft_p50_s']:.2f} | {row['ttft_p95_s']:.2f} | {row['itl_p95_s']:.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--src", default=DEFAULT_MODEL)
    parser.add_argument("--clients", default="1,4,16,64", help="comma list of concurrent clients")
    parser.add_argument("--requests-per-client", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rows", type=int, default=64, help="rows per batch for both servers")
    parser.add_argument("--servers", default="paw,mlx-lm")
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--docs", type=Path, action="append", default=[],
                        help="markdown files whose serve-bench block to rewrite (README.md, docs/benchmarks.md)")
    args = parser.parse_args(argv)

    import interp  # noqa: F401  (OpenBLAS under MLX, in this process too)
    from apps.benchmarks import prepare
    from interp.docblock import replace_block

    say = lambda msg: print(f"  {msg}", file=sys.stderr, flush=True)  # noqa: E731
    root = prepare.bench_dir() / prepare.source_key(args.src)
    hf = prepare.hf_folder(args.src, root, say)
    paths = {"mlx-lm": prepare.mlx_lm_model(hf, root, "float32", 0, 64, say),
             "paw": prepare.paw_program(hf, root, "float32", 0, 64, say)}
    names = [s.strip() for s in args.servers.split(",") if s.strip()]
    clients = [int(c) for c in args.clients.split(",")]
    args.results.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y-%m-%d_%H%M%S")
    servers = {}
    try:
        for name in names:
            port = free_port()
            log = Path(tempfile.gettempdir()) / f"paw-serve-bench-{stamp}-{name}.log"  # the servers' own output
            start = start_paw if name == "paw" else start_mlx_lm
            servers[name] = start(paths[name], port, args.rows, log)
        for name, server in servers.items():
            server.wait_ready("/health" if name == "paw" else "/v1/models")
            model = paths[name].name if name == "paw" else str(paths[name])
            asyncio.run(run_level(server, model, 2, 1, 8))  # warm-up: compile, caches
            say(f"{name} ready on {server.url}")
        levels = []
        for i, count in enumerate(clients):
            order = names if i % 2 == 0 else names[::-1]
            for name in order:
                model = paths[name].name if name == "paw" else str(paths[name])
                level = asyncio.run(run_level(servers[name], model, count, args.requests_per_client,
                                              args.max_tokens))
                summary = level.summary()
                summary["rss_gb"] = round(servers[name].rss_bytes() / 1e9, 3)
                levels.append(summary)
                say(f"{name} x{count}: {summary['tokens_per_s']} tok/s, TTFT p50 {summary['ttft_p50_s']} s, "
                    f"ITL p95 {summary['itl_p95_s']} s, errors {summary['errors']}")
    finally:
        for server in servers.values():
            server.stop()
    single = next((r for r in levels if r["server"] == "paw" and r["clients"] == 1), None)
    single_stream = single["decode_tps_p50"] if single else 0.0
    report = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                          "load_average": list(os.getloadavg())},
              "settings": vars(args) | {"results": str(args.results), "docs": [str(d) for d in args.docs]},
              "paw_single_stream_decode_tps": round(single_stream, 2), "levels": levels}
    text = table(levels, single_stream)
    header = (f"Run {stamp.replace('_', ' ')} on {platform.machine()} ({os.cpu_count()} CPUs); "
              f"SmolLM2-135M-Instruct float32, greedy chat completions of up to {args.max_tokens} tokens, "
              f"{args.requests_per_client} per client, streamed; paw single-stream decode "
              f"{single_stream:.1f} tok/s.")
    print(header + "\n\n" + text)
    (args.results / f"serve-{stamp}.json").write_text(json.dumps(report, indent=1) + "\n")
    (args.results / f"serve-{stamp}.md").write_text(header + "\n\n" + text + "\n")
    for doc in args.docs:
        replace_block(doc, "<!-- serve-bench:start -->", "<!-- serve-bench:end -->", header + "\n\n" + text + "\n")


if __name__ == "__main__":
    main()
