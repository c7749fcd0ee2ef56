"""Hostile inputs on the surfaces beyond programs (tests/hostile.py), a few seeded cases each.

``paw serve`` bodies: below 500, 4xx with OpenAI's error object, and the server answers a
good request afterwards. ``.paw`` bundles and ``--examples`` files: read, or one PawError
line. CLI arguments: success, one ``paw: error:`` line, or click's usage error (exit 2). Model
folders for ``paw export``: a program ``paw run`` takes, or one PawError line and nothing written.
``scripts/fuzz.py --surface ...`` runs the same generators for thousands of cases.
"""

from __future__ import annotations

import random
import tempfile
from pathlib import Path

import httpx
import pytest

from tests.fuzzing import RandomChooser
from tests.hostile import (
    GOOD_CHAT,
    bundle_campaign,
    cli_campaign,
    cli_cases,
    examples_campaign,
    request_campaign,
    source_campaign,
)

SEED = 20261201


@pytest.fixture
def server(tiny_program):
    """A served tiny program, stopped after its test: a fork (run_paw's subprocesses) while the
    server's threads run can deadlock in the child before exec."""
    import paw_mlx
    from apps.serve.app import ServeConfig, create_app
    from apps.serve.runner import BackgroundServer
    from paw_mlx.engine import Engine, EngineConfig, ModelCatalog

    catalog = ModelCatalog()
    catalog.add_base(paw_mlx.load(tiny_program), name="tiny")
    engine = Engine(EngineConfig(max_rows=16, max_queue=64))
    with BackgroundServer(create_app(catalog, engine, ServeConfig(max_tokens=8))) as running:
        # a connection per request: one run saw a reused keep-alive connection reset by the
        # server (not reproduced in 360 more requests; a client-side reuse race is the likely cause)
        with httpx.Client(base_url=running.url, timeout=60, headers={"Connection": "close"}) as client:
            yield client


def test_hostile_request_bodies_get_4xx_and_the_server_stays_up(server):
    failures = request_campaign(server, RandomChooser(SEED), 120)
    assert not failures, "\n".join(failures)
    assert server.post("/v1/chat/completions", json=GOOD_CHAT).status_code == 200
    assert server.get("/health").json()["status"] == "ok"


@pytest.fixture(scope="module")
def bundle_base(tmp_path_factory, tiny_tokenizer):
    from tests.archs import arch_config
    from tests.paw_mlx.test_pawfile import gguf_adapter, members
    from tests.tiny import export_tiny

    base = export_tiny(arch_config("qwen3"), tmp_path_factory.mktemp("bundle-base") / "qwen3", tokenizer=tiny_tokenizer)
    return base, members(gguf_adapter("qwen3", "F32")[0])


def test_mutated_bundles_load_or_are_one_error(bundle_base, tmp_path):
    base, good = bundle_base
    failures = bundle_campaign(base, good, tmp_path, RandomChooser(SEED), 40)
    assert not failures, "\n".join(failures)


def test_hostile_examples_files_are_read_or_one_error(tmp_path):
    failures = examples_campaign(tmp_path, RandomChooser(SEED), 60)
    assert not failures, "\n".join(failures)


def test_hostile_cli_arguments_end_in_one_line_or_a_usage_error(tiny_program):
    with tempfile.TemporaryDirectory(prefix="paw-hostile-") as tmp:
        failures = cli_campaign(random.Random(SEED).sample(cli_cases(tiny_program, Path(tmp)), 6))
    assert not failures, "\n".join(failures)


def test_damaged_model_folders_export_or_are_one_error(tmp_path, tiny_tokenizer):
    from tests.tiny import tiny_llama_config, tiny_model

    folder = tmp_path / "model"
    tiny_model(tiny_llama_config()).save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    (tmp_path / "work").mkdir()
    failures = source_campaign(folder, tmp_path / "work", RandomChooser(SEED), 24)
    assert not failures, "\n".join(failures)
