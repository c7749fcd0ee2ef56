"""Schema fuzzing: schemathesis sends requests generated from the server's own OpenAPI document.

Bounded (a fixed number of examples per route, a small token cap so each generated request
stays short) and on loopback. The property: whatever arrives, the server answers without a
5xx, and every error carries OpenAI's error object.
"""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, settings

import paw_mlx
from apps.serve.app import ServeConfig, create_app
from apps.serve.runner import BackgroundServer
from paw_mlx.engine import Engine, EngineConfig, ModelCatalog


@pytest.fixture(scope="module")
def fuzzed_server(tiny_program):
    catalog = ModelCatalog()
    catalog.add_base(paw_mlx.load(tiny_program), name="tiny")
    engine = Engine(EngineConfig(max_rows=16, max_queue=4096))
    with BackgroundServer(create_app(catalog, engine, ServeConfig(max_tokens=8))) as server:
        yield server


@pytest.fixture(scope="module")
def api_schema(fuzzed_server):
    schema = schemathesis.openapi.from_url(fuzzed_server.url + "/openapi.json")
    # valid bodies reach the engine; invalid ones (wrong types, out of range) test the refusals
    schema.config.generation.update(modes=[schemathesis.GenerationMode.POSITIVE,
                                           schemathesis.GenerationMode.NEGATIVE])
    return schema


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_request_gets_a_server_error(case):
    if case.body is not None and isinstance(case.body, dict) and case.path.endswith("completions"):
        case.body["model"] = "tiny"  # reach the engine, not only the model lookup
    response = case.call(timeout=60)
    assert response.status_code < 500, response.text
    if response.status_code >= 400:
        error = response.json()["error"]
        assert error["message"] and error["type"]
