"""Fuzz: mutated programs and compiled programs end in success or one paw error, nothing else.

Each example copies the tiny program (or a program compiled on it), applies up to three
mutations (tests/fuzzing.py) and runs ``paw`` on it in a subprocess with a timeout and an
address-space cap, as a user's process would meet it. A traceback, a signal (segfault,
abort), a hang or a multi-line error fails the test; hypothesis then shrinks the
mutations. 96 cases here, two to an example run side by side (each case's process mostly
starts Python, on one core); ``scripts/fuzz.py`` runs thousands.
"""

from __future__ import annotations

import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.fuzzing import HypothesisChooser, compile_artifact, prepare_case, run_paw

FUZZ = settings(deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow,
                                                                      HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def compiled_on_tiny(tiny_program, tmp_path_factory) -> Path:
    return compile_artifact(tiny_program, tmp_path_factory.mktemp("fuzz") / "options")


#: cases an example mutates (drawn one after the other) and then runs at the same time
SIDE_BY_SIDE = 2


def check_cases(kind: str, program: Path, artifact: Path | None, data) -> None:
    chooser = HypothesisChooser(data)
    with tempfile.TemporaryDirectory(prefix="paw-fuzz-") as work:
        prepared = []
        for index in range(SIDE_BY_SIDE):
            (Path(work) / str(index)).mkdir()
            prepared.append(prepare_case(kind, program, artifact, Path(work) / str(index), chooser,
                                         1 + chooser.below(3)))
        with ThreadPoolExecutor(SIDE_BY_SIDE) as pool:
            outcomes = list(pool.map(run_paw, [command for _, command in prepared]))
    failed = [f"paw {' '.join(command)}\nmutations: {case.notes}\n{outcome.verdict}: {outcome.detail}"
              for (case, command), outcome in zip(prepared, outcomes, strict=True) if not outcome.acceptable]
    assert not failed, "\n\n".join(failed)


@settings(FUZZ, max_examples=64 // SIDE_BY_SIDE)
@given(data=st.data())
def test_mutated_programs_succeed_or_fail_with_one_paw_error(tiny_program, data):
    check_cases("program", tiny_program, None, data)


@settings(FUZZ, max_examples=32 // SIDE_BY_SIDE)
@given(data=st.data())
def test_mutated_compiled_programs_succeed_or_fail_with_one_paw_error(tiny_program, compiled_on_tiny, data):
    check_cases("artifact", tiny_program, compiled_on_tiny, data)
