"""A bounded load test of ``paw serve``: many requests over mixed programs and settings.

    python -m apps.benchmarks.serve_load --requests 2000 --clients 32      # SmolLM2 + 4 compiled programs

It starts ``paw serve`` on a loopback port (a separate process, so its memory is its own),
computes every greedy request's expected output with ``paw_mlx`` in this process (single
stream, no batching), then sends the requests from ``--clients`` concurrent clients:
chat and text completions, streamed and not, base model and compiled programs, stop
strings, log-probabilities, seeded sampling; ``--malformed`` of them are bad requests and
``--disconnect`` of them streams that hang up after a few tokens. It passes when no
response is a 5xx, every bad request got a 4xx, every completed greedy response equals
its expected output, every seeded request repeats its first answer, and the server's
resident memory after the run is within 10% of its idle level (after warm-up rounds of the
same kind of requests fill the prompt cache to its working size). It stops by itself:
every request has a timeout.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PROGRAM_SPECS = {
    "sentiment": "Label the sentiment of the text as positive, negative or neutral. Answer with one word.",
    "capital": "Name the capital city of the country in the text. Answer with the city only.",
    "translate": "Translate the text to French.",
    "keywords": "List the three most important keywords of the text, separated by commas.",
}
TEXTS = ["I loved this film, it was wonderful.", "The service was slow and the food was cold.", "France",
         "Japan", "The weather is nice today.", "Machine learning models need data.", "Brazil",
         "I am not sure how I feel about this.", "Good morning, my friend.", "Cats sleep most of the day."]
BAD_BODIES = [
    {"model": "no-such-model", "messages": [{"role": "user", "content": "hi"}]},
    {"model": "{base}", "messages": "not a list"},
    {"model": "{base}", "messages": [{"role": "user", "content": "hi"}], "max_tokens": -5},
    {"model": "{base}", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10**9},
    {"model": "{base}", "messages": [{"role": "user", "content": "hi"}], "temperature": "hot"},
    {"model": "{base}", "messages": [{"role": "wizard", "content": "hi"}]},
    {"model": "{base}", "prompt": ["x"] * 1000},
    "{not json",
]


@dataclass
class Job:
    index: int
    kind: str  # chat | text | bad | disconnect
    model: str
    text: str
    stream: bool = False
    max_tokens: int = 16
    stop: list[str] | None = None
    logprobs: bool = False
    seed: int | None = None  # sampled (temperature 1) when set
    bad: Any = None
    expected: str | None = None

    def body(self) -> dict:
        if self.kind == "bad":
            return self.bad
        body: dict[str, Any] = {"model": self.model, "max_tokens": self.max_tokens, "stream": self.stream}
        if self.kind == "text":
            body["prompt"] = self.text
        else:
            body["messages"] = [{"role": "user", "content": self.text}]
        if self.stop:
            body["stop"] = self.stop
        if self.logprobs:
            body.update({"logprobs": 2} if self.kind == "text" else {"logprobs": True, "top_logprobs": 2})
        if self.seed is not None:
            body.update(temperature=1.0, top_p=0.95, seed=self.seed)
        return body


def plan(count: int, base: str, programs: list[str], malformed: float, disconnect: float, seed: int = 0) -> list[Job]:
    """A reproducible mix of requests."""
    rng = random.Random(seed)
    jobs = []
    for i in range(count):
        roll = rng.random()
        model = rng.choice([base, *programs]) if programs else base
        text = rng.choice(TEXTS)
        if roll < malformed:
            bad = rng.choice(BAD_BODIES)
            bad = json.loads(json.dumps(bad).replace("{base}", base)) if isinstance(bad, dict) else bad
            jobs.append(Job(i, "bad", base, "", bad=bad))
            continue
        if roll < malformed + disconnect:
            jobs.append(Job(i, "disconnect", model, text, stream=True, max_tokens=64))
            continue
        kind = "chat" if (model != base or rng.random() < 0.6) else "text"
        job = Job(i, kind, model, text, stream=rng.random() < 0.5, max_tokens=rng.choice([4, 8, 16, 24]),
                  logprobs=rng.random() < 0.15)
        if rng.random() < 0.1:
            job.seed = rng.randrange(4)
        elif rng.random() < 0.15:
            job.stop = [rng.choice([".", ",", " the", "\n"])]
        jobs.append(job)
    return jobs


def cut_at_stop(text: str, stop: list[str] | None) -> str:
    cuts = [text.find(s) for s in stop or [] if s in text]
    return text[: min(cuts)] if cuts else text


def fill_expected(jobs: list[Job], reference) -> int:
    """Set each greedy job's expected text with ``reference(kind, model, text, max_tokens)`` (memoized)."""
    memo: dict[tuple, str] = {}
    for job in jobs:
        if job.kind in ("bad", "disconnect") or job.seed is not None:
            continue
        key = (job.kind, job.model, job.text, job.max_tokens)
        if key not in memo:
            memo[key] = reference(*key)
        job.expected = cut_at_stop(memo[key], job.stop)
    return len(memo)


def paw_reference(base_dir: Path, program_dirs: dict[str, Path], base_name: str):
    """Greedy outputs the way ``paw run`` and ``paw_mlx.function`` produce them (one stream at a time)."""
    import paw_mlx

    prog = paw_mlx.load(base_dir)
    functions: dict[tuple[str, int], Any] = {}

    def reference(kind: str, model: str, text: str, max_tokens: int) -> str:
        if model != base_name:
            key = (model, max_tokens)
            if key not in functions:
                functions[key] = paw_mlx.function(program_dirs[model], base=base_dir, max_new_tokens=max_tokens)
            return functions[key](text)
        ids = paw_mlx.prompt_ids(prog, text, raw=kind == "text")
        return prog.tokenizer.decode_finished(list(paw_mlx.stream_tokens(prog, ids, max_tokens=max_tokens)),
                                              skip_special_tokens=True)

    return reference


@dataclass
class Report:
    statuses: Counter = field(default_factory=Counter)
    mismatches: list[dict] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    completed: int = 0
    disconnected: int = 0
    seeded: dict = field(default_factory=dict)
    seconds: float = 0.0

    def ok(self) -> bool:
        return not self.failures and not self.mismatches and not any(s >= 500 for s in self.statuses)


async def _send(client, url: str, job: Job, report: Report, api_key: str | None) -> None:
    import httpx

    path = "/v1/completions" if job.kind == "text" or (job.kind == "bad" and isinstance(job.bad, dict)
                                                       and "prompt" in job.bad) else "/v1/chat/completions"
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    if job.kind == "bad" and isinstance(job.bad, str):
        response = await client.post(url + path, content=job.bad.encode(),
                                     headers={**headers, "Content-Type": "application/json"})
        report.statuses[response.status_code] += 1
        if not 400 <= response.status_code < 500:
            report.failures.append(f"job {job.index}: malformed JSON got {response.status_code}")
        return
    try:
        if not job.stream:
            response = await client.post(url + path, json=job.body(), headers=headers)
            report.statuses[response.status_code] += 1
            if job.kind == "bad":
                if not 400 <= response.status_code < 500:
                    report.failures.append(f"job {job.index}: bad request got {response.status_code}")
                return
            if response.status_code != 200:
                report.failures.append(f"job {job.index}: {response.status_code} {response.text[:200]}")
                return
            choice = response.json()["choices"][0]
            _check(job, choice["message"]["content"] if job.kind == "chat" else choice["text"], report)
            return
        pieces = []
        async with client.stream("POST", url + path, json=job.body(), headers=headers) as response:
            report.statuses[response.status_code] += 1
            if response.status_code != 200:
                await response.aread()
                report.failures.append(f"job {job.index}: {response.status_code}")
                return
            chunks = 0
            async for line in response.aiter_lines():
                if not line.startswith("data: {"):
                    continue
                body = json.loads(line[6:])
                if "error" in body:
                    report.failures.append(f"job {job.index}: error event {body['error']}")
                    return
                for choice in body.get("choices") or []:
                    pieces.append((choice.get("delta") or {}).get("content") or choice.get("text") or "")
                chunks += 1
                if job.kind == "disconnect" and chunks >= 3:
                    report.disconnected += 1
                    return  # leaving the block closes the connection mid-stream
        _check(job, "".join(pieces), report)
    except httpx.HTTPError as exc:
        report.failures.append(f"job {job.index}: {type(exc).__name__}: {exc}")


def _check(job: Job, text: str, report: Report) -> None:
    report.completed += 1
    if job.seed is not None:
        key = (job.kind, job.model, job.text, job.max_tokens, job.seed, job.stop and tuple(job.stop))
        first = report.seeded.setdefault(key, text)
        if first != text:
            report.mismatches.append({"job": job.index, "seeded": True, "first": first, "got": text})
    elif job.expected is not None and text != job.expected:
        report.mismatches.append({"job": job.index, "model": job.model, "kind": job.kind, "stream": job.stream,
                                  "expected": job.expected, "got": text})


async def run_load(url: str, jobs: list[Job], clients: int, api_key: str | None = None,
                   timeout: float = 600.0) -> Report:
    """Send ``jobs`` from ``clients`` concurrent connections; returns what came back."""
    import httpx

    report = Report()
    queue: asyncio.Queue[Job] = asyncio.Queue()
    for job in jobs:
        queue.put_nowait(job)
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(timeout), limits=limits) as client:
        async def worker() -> None:
            while not queue.empty():
                await _send(client, url, queue.get_nowait(), report, api_key)

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        report.seconds = time.perf_counter() - start
    return report


# ---------------------------------------------------------------------- the script


def _rss(pid: int) -> int:
    return int(Path(f"/proc/{pid}/status").read_text().split("VmRSS:")[1].split()[0]) * 1024


def _settle(url: str, timeout: float = 120.0) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        health = httpx.get(url + "/health", timeout=10).json()
        if health["rows"] == 0 and health["queued"] == 0:
            time.sleep(1.0)  # the worker's idle turn frees its buffers
            return
        time.sleep(0.2)
    raise RuntimeError("the server did not drain")


def warm_up(url: str, base_name: str, programs: list[str], clients: int, rounds: int = 20) -> dict:
    """Rounds of the same kind of requests until the prompt cache nears its budget (or stops
    growing for two rounds); returns the server's health after them.

    The idle level the memory check compares with is then the server's working size: the
    prompt cache keeps up to ``--prompt-cache-mb`` of KV on purpose.
    """
    import httpx

    before, still = 0, 0
    for round_ in range(rounds):
        jobs = plan(max(64, clients * 2), base_name, programs, 0.0, 0.0, seed=100 + round_)
        asyncio.run(run_load(url, jobs, clients))
        _settle(url)
        health = httpx.get(url + "/health", timeout=10).json()
        size, limit = health["prompt_cache_bytes"], health["prompt_cache_limit"]
        still = still + 1 if size < 1.02 * before else 0
        if size >= 0.9 * limit or still >= 2:
            break
        before = size
    return health


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", type=Path, default=None, help="base program (default: the smollm2 program)")
    parser.add_argument("--programs", type=Path, default=Path("/tmp/paw-load-programs"),
                        help="where to compile (or find) the test programs")
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--malformed", type=float, default=0.05)
    parser.add_argument("--disconnect", type=float, default=0.05)
    parser.add_argument("--prompt-cache-mb", type=int, default=128,
                        help="the server's prompt-cache budget: small enough for the warm-up to fill it")
    parser.add_argument("--out", type=Path, default=None, help="write the JSON report here")
    parser.add_argument("--docs", type=Path, action="append", default=[],
                        help="markdown files whose serve-load block to rewrite with the result")
    args = parser.parse_args(argv)

    import httpx

    import paw_mlx
    from apps.benchmarks.serve_bench import free_port
    from interp.paths import default_program_dir

    base = args.base or default_program_dir()
    programs = {}
    for name, spec in PROGRAM_SPECS.items():
        programs[name] = args.programs / name
        if not programs[name].exists():
            paw_mlx.compile(spec, base=base, out_dir=programs[name], max_new_tokens=24)
    base_name = base.name
    jobs = plan(args.requests, base_name, list(programs), args.malformed, args.disconnect)
    started = time.perf_counter()
    distinct = fill_expected(jobs, paw_reference(base, programs, base_name))
    print(f"expected outputs: {distinct} distinct greedy requests in {time.perf_counter() - started:.0f} s",
          file=sys.stderr, flush=True)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "apps.cli", "serve", str(base), "--programs", str(args.programs),
                               "--port", str(port), "--log-level", "warning", "--max-queue", "4096",
                               "--prompt-cache-mb", str(args.prompt_cache_mb)])
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError as exc:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("paw serve did not start") from exc
            time.sleep(0.5)
        idle_health = warm_up(url, base_name, list(programs), args.clients)
        idle = _rss(server.pid)
        report = asyncio.run(run_load(url, jobs, args.clients))
        _settle(url)
        after = _rss(server.pid)
        health = httpx.get(url + "/health", timeout=10).json()
    finally:
        server.terminate()
        server.wait(30)
    growth = after / idle - 1
    if abs(growth) > 0.10:
        report.failures.append(f"resident memory went from {idle / 1e6:.0f} MB idle to {after / 1e6:.0f} MB")
    summary = {"requests": len(jobs), "clients": args.clients, "seconds": round(report.seconds, 1),
               "statuses": dict(sorted(report.statuses.items())), "completed": report.completed,
               "disconnected": report.disconnected, "mismatches": len(report.mismatches),
               "failures": report.failures[:20], "rss_idle_mb": round(idle / 1e6, 1),
               "rss_after_mb": round(after / 1e6, 1), "rss_growth": round(growth, 4),
               "prompt_cache_idle_mb": round(idle_health["prompt_cache_bytes"] / 1e6, 1),
               "prompt_cache_after_mb": round(health["prompt_cache_bytes"] / 1e6, 1),
               "server_health": health, "passed": report.ok()}
    print(json.dumps(summary, indent=1))
    if report.mismatches:
        print(json.dumps(report.mismatches[:5], indent=1, ensure_ascii=False), file=sys.stderr)
    if args.out:
        args.out.write_text(json.dumps(summary | {"mismatch_examples": report.mismatches[:20]}, indent=1) + "\n")
    if args.docs:
        from interp.docblock import replace_block

        statuses = ", ".join(f"{n} x {status}" for status, n in summary["statuses"].items())
        text = (f"Run {time.strftime('%Y-%m-%d %H:%M')}: {len(jobs)} requests from {args.clients} clients in "
                f"{summary['seconds']} s on {base.name} and {len(programs)} compiled programs; statuses: {statuses}; "
                f"{report.completed} completed, {report.disconnected} disconnected mid-stream, "
                f"{len(report.mismatches)} outputs different from their expected greedy output; resident memory "
                f"{summary['rss_idle_mb']} MB idle, {summary['rss_after_mb']} MB after "
                f"({summary['rss_growth'] * 100:+.1f}%; the prompt cache held {summary['prompt_cache_idle_mb']} and "
                f"{summary['prompt_cache_after_mb']} MB of its {args.prompt_cache_mb} MB); "
                f"{'passed' if report.ok() else 'FAILED'}.\n")
        for doc in args.docs:
            replace_block(doc, "<!-- serve-load:start -->", "<!-- serve-load:end -->", text)
    sys.exit(0 if report.ok() else 1)


if __name__ == "__main__":
    main()
