"""tests/prefetch.py's worker builds exactly what the session fixtures would build themselves."""

from __future__ import annotations

import filecmp

import numpy as np
import pytest

from tests.archs import export_arch, reference_results
from tests.prefetch import Prefetch


@pytest.mark.parametrize("arch", ["gpt2"])
def test_prefetched_builds_equal_the_fixtures_own(arch_cases, arch, tmp_path):
    case = arch_cases(arch)
    assert case.dir.parents[1].name.startswith("paw-prefetch-"), f"{case.dir}: not the worker's build"
    own = export_arch(arch, "float32", tmp_path / arch)
    compared = filecmp.dircmp(case.dir, own)
    _, mismatch, errors = filecmp.cmpfiles(case.dir, own, compared.common_files, shallow=False)
    assert compared.common_files and not (mismatch or errors or compared.left_only or compared.right_only)
    ids, logits, greedy = reference_results(arch)
    assert np.array_equal(case.ids.numpy(), ids) and np.array_equal(case.logits, logits) and case.greedy == greedy


def test_a_failed_build_is_left_to_the_fixture():
    prefetch = Prefetch()
    try:
        prefetch.start({"unbuildable": False})  # not a build's name: the worker fails on it at once
        assert prefetch.take("unbuildable") is None  # the fixture then builds it, and fails there
        assert "Traceback" in (prefetch.root / "unbuildable.failed").read_text()
        assert prefetch.take("llama-float32") is None  # not asked for
    finally:
        prefetch.stop()
    assert not prefetch.root.exists()
