"""The session's big builds, made in a second process while the suite runs its first tests.

The suite's own process computes on one core most of the time (MLX's CPU ops on tiny
shapes), and its costliest fixtures are builds nothing else depends on: the tiny
architectures' exports with transformers' reference results (tests/archs.py), and the
real SmolLM2's export. ``Prefetch.start`` hands the ones the collected tests will ask for
to a worker process (``python -m tests.prefetch``) that builds them in the order the tests
need them, on the other core; the session fixtures (tests/conftest.py) take each build
when it is ready, and make it themselves if the worker was not asked for it or failed.

A build is published by renaming it into place (the program directory, then a ``.done``
file), so a fixture never reads a half-written one. The worker stops when the session does.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SMOLLM2 = "smollm2"  # the job that exports the real default model
REFERENCE_FILE = "reference.npz"


def arch_build(model_type: str, dtype: str = "float32") -> str:
    """The name of a tiny architecture's build (its export, and transformers' results where asked for)."""
    return f"{model_type}-{dtype}"


def _build(job: str, out: Path) -> None:
    """Build ``job`` into the new directory ``out``."""
    if job == SMOLLM2:
        from exporter.export import export_source

        export_source("smollm2", out / "prog")
        return
    from tests.archs import export_arch, reference_results

    name, _, extra = job.partition("+")
    model_type, dtype = name.rsplit("-", 1)
    export_arch(model_type, dtype, out / "prog")
    if extra == "reference":
        import numpy as np

        ids, logits, greedy = reference_results(model_type)
        np.savez(out / REFERENCE_FILE, ids=ids, logits=logits, greedy=np.array(greedy))


def work(root: Path, jobs: list[str]) -> None:
    """Build each job (a build's name, ``+reference`` to add transformers' results) into ``root/NAME``
    in turn; a failed one leaves ``root/NAME.failed`` with its traceback."""
    for job in jobs:
        name = job.partition("+")[0]
        scratch = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=root))
        try:
            _build(job, scratch)
        except Exception:  # any failure: the fixture builds it itself and shows the error there
            (root / f"{name}.failed").write_text(traceback.format_exc())
            shutil.rmtree(scratch, ignore_errors=True)
            continue
        scratch.rename(root / name)
        (root / f"{name}.done").touch()


class Prefetch:
    """The worker process of one session and the directory it builds in."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="paw-prefetch-"))
        self.jobs: list[str] = []
        self._process: subprocess.Popen | None = None

    def start(self, builds: dict[str, bool]) -> None:
        """Start making ``builds`` (names from ``arch_build``, or ``SMOLLM2``) in this order; a build
        whose value is true gets transformers' reference results too."""
        self.jobs = [name + ("+reference" if reference else "") for name, reference in builds.items()]
        if not self.jobs:
            return
        env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
        self._process = subprocess.Popen([sys.executable, "-m", "tests.prefetch", str(self.root), *self.jobs],
                                         cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                         stderr=subprocess.DEVNULL)

    def take(self, name: str) -> Path | None:
        """The directory the worker built for ``name`` (waiting for it), or None: not asked, or it failed."""
        if self._process is None or name not in {job.partition("+")[0] for job in self.jobs}:
            return None
        done = self.root / f"{name}.done"
        while not done.exists():
            if (self.root / f"{name}.failed").exists():
                return None
            if self._process.poll() is not None and not done.exists():
                return None
            time.sleep(0.05)
        return self.root / name

    def stop(self) -> None:
        """End the worker (if it still runs) and remove what it built."""
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            self._process.wait(30)
        shutil.rmtree(self.root, ignore_errors=True)


if __name__ == "__main__":
    work(Path(sys.argv[1]), sys.argv[2:])
