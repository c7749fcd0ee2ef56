"""The load test of ``apps/benchmarks/serve_load.py``, small: 200 mixed requests against the tiny model.

The full run (2,000 requests on SmolLM2, memory checked) is ``python -m apps.benchmarks.serve_load``.
"""

from __future__ import annotations

import asyncio
import time

import httpx

import paw_mlx
from apps.benchmarks.serve_load import fill_expected, paw_reference, plan, run_load
from apps.serve.app import ServeConfig, create_app
from apps.serve.runner import BackgroundServer
from paw_mlx.engine import Engine, EngineConfig
from tests.serving import compile_programs, make_catalog


def test_two_hundred_mixed_requests(tiny_program, tmp_path):
    programs = compile_programs(tiny_program, tmp_path / "programs")
    catalog = make_catalog(paw_mlx.load(tiny_program), programs)
    jobs = plan(200, "tiny", list(programs), malformed=0.05, disconnect=0.05, seed=3)
    fill_expected(jobs, paw_reference(tiny_program, programs, "tiny"))
    engine = Engine(EngineConfig(max_rows=12, prefill_chunk=16))
    with BackgroundServer(create_app(catalog, engine, ServeConfig(max_tokens=64))) as server:
        report = asyncio.run(run_load(server.url, jobs, clients=16, timeout=60))
        deadline = time.monotonic() + 30
        while (health := httpx.get(server.url + "/health", timeout=10).json())["rows"] and time.monotonic() < deadline:
            time.sleep(0.05)
    assert report.ok(), (report.failures[:3], report.mismatches[:3], report.statuses)
    assert report.completed >= 170 and report.disconnected >= 5 and sum(report.statuses.values()) == 200
    assert sum(n for status, n in report.statuses.items() if 400 <= status < 500) >= 5
    assert health["rows"] == 0 and health["queued"] == 0
