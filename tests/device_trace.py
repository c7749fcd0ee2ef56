"""A pytest plugin that lists, per test, the device predicates of interp/device.py it reaches.

How the fake-Mac pass's file list is checked (docs/devices.md): a test file that reaches no
predicate, run alone, takes the same branches in both passes, so the second pass can leave it
out (``pytestmark = pytest.mark.not_fake_mac_pass``). Whether a test reaches any predicate does
not depend on the pass (the code before the first one is the same), so the normal pass checks
it; run one file at a time, so a fixture or compiled function another file built cannot hide one:

    PAW_DEVICE_TRACE=out.json pytest -p tests.device_trace tests/interp/test_x.py

It records an access of a predicate through the module (``device.on_cpu``, as ops call them)
and every call of one, including calls from inside interp/device.py (``describe`` -> ``backend``).
"""

from __future__ import annotations

import json
import os
import types

import pytest

PREDICATES = ("on_cpu", "on_gpu", "has_metal", "has_cuda", "metal_kernels", "backend", "describe")
_reached: set[str] = set()
_per_test: dict[str, list[str]] = {}


class _Traced(types.ModuleType):
    def __getattribute__(self, name):
        if name in PREDICATES:
            _reached.add(name)
        return super().__getattribute__(name)


def _traced(name, predicate):
    def call(*args, **kwargs):
        _reached.add(name)
        return predicate(*args, **kwargs)

    return call


@pytest.hookimpl(trylast=True)  # after tests/conftest.py installed the fake-Mac answers
def pytest_configure(config):
    from interp import device

    for name in PREDICATES:
        device.__dict__[name] = _traced(name, device.__dict__[name])
    device.__class__ = _Traced


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    _reached.clear()
    yield
    _per_test[item.nodeid] = sorted(_reached)


def pytest_unconfigure(config):
    path = os.environ.get("PAW_DEVICE_TRACE", "device-trace.json")
    with open(path, "w", encoding="utf-8") as out:
        json.dump(_per_test, out, indent=1)
