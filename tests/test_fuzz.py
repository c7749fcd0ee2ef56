"""Fuzz: mutated programs and compiled programs end in success or one paw error, nothing else.

Each example copies the tiny program (or a program compiled on it), applies up to three
mutations (tests/fuzzing.py) and runs ``paw`` on it in a subprocess with a timeout and an
address-space cap, as a user's process would meet it. A traceback, a signal (segfault,
abort), a hang or a multi-line error fails the test; hypothesis then shrinks the
mutations. 96 cases here (about 40 s on two cores); ``scripts/fuzz.py`` runs
thousands.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.fuzzing import HypothesisChooser, compile_artifact, fuzz_case

FUZZ = settings(deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow,
                                                                      HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def compiled_on_tiny(tiny_program, tmp_path_factory) -> Path:
    return compile_artifact(tiny_program, tmp_path_factory.mktemp("fuzz") / "options")


def check_case(kind: str, program: Path, artifact: Path | None, data) -> None:
    chooser = HypothesisChooser(data)
    with tempfile.TemporaryDirectory(prefix="paw-fuzz-") as work:
        case, outcome, command = fuzz_case(kind, program, artifact, Path(work), chooser, 1 + chooser.below(3))
    assert outcome.acceptable, f"paw {' '.join(command)}\nmutations: {case.notes}\n{outcome.verdict}: {outcome.detail}"


@settings(FUZZ, max_examples=64)
@given(data=st.data())
def test_mutated_programs_succeed_or_fail_with_one_paw_error(tiny_program, data):
    check_case("program", tiny_program, None, data)


@settings(FUZZ, max_examples=32)
@given(data=st.data())
def test_mutated_compiled_programs_succeed_or_fail_with_one_paw_error(tiny_program, compiled_on_tiny, data):
    check_case("artifact", tiny_program, compiled_on_tiny, data)
