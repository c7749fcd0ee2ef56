"""Real ranks over MLX's ring backend on the loopback address: the same tokens as one process, and
one clear line on every rank when a rank dies, hangs or never comes up.

Launches use ``mlx.launch`` from the venv (``--python sys.executable``) on free ports, or
start the ranks directly with the variables mlx.launch sets (MLX_RANK, MLX_HOSTFILE) when
a test must signal one rank. Every process has a timeout.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from interp.distributed.stages import const_bytes
from interp.program import read_program
from tests.interp.distributed.conftest import LAYERED
from tests.interp.distributed.rank_script import exercise

LAUNCH = str(Path(sys.executable).parent / "mlx.launch")
PAW = str(Path(sys.executable).parent / "paw")
SCRIPT = str(Path(__file__).with_name("rank_script.py"))


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for sock in sockets:
        sock.bind(("127.0.0.1", 0))
    ports = [sock.getsockname()[1] for sock in sockets]
    for sock in sockets:
        sock.close()
    return ports


def free_port_run(count: int) -> int:
    """The first of ``count`` consecutive free loopback ports (mlx.launch's ``--starting-port``
    gives rank i the port start + i, so every one of them must be free, not just the first)."""
    for _ in range(50):
        start = free_ports(1)[0]
        if start + count > 65535:
            continue
        sockets = []
        try:
            for port in range(start, start + count):
                sock = socket.socket()
                sockets.append(sock)
                sock.bind(("127.0.0.1", port))
        except OSError:
            continue
        finally:
            for sock in sockets:
                sock.close()
        return start
    raise RuntimeError(f"no {count} consecutive free loopback ports")


def launch(ranks: int, *command: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """``mlx.launch -n RANKS --backend ring`` of COMMAND (a script path, or the paw console script)."""
    port = free_port_run(ranks)
    args = [LAUNCH, "-n", str(ranks), "--backend", "ring", "--starting-port", str(port), "--python",
            sys.executable, "--", *command]
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, PAW_DIST_TIMEOUT="30"))


@functools.cache
def reference(path: Path) -> dict:
    import paw_mlx

    return exercise(paw_mlx.load(path, parallel="none"))


#: per rank count: (mode, model type) of each program one launch runs. Three ranks over four
#: layers split unevenly; tensor parallelism over three ranks keeps llama's two KV heads whole
#: and splits its MLP. (Every architecture's tensor split is checked in one process, in
#: tests/exporter/test_architectures.py; here the runtime: broadcasts, all_sums, caches.)
JOBS = {2: [("pipeline", arch) for arch in LAYERED] + [("tensor", "qwen2_moe")],
        3: [("pipeline", arch) for arch in LAYERED] + [("tensor", "llama")]}


@pytest.mark.parametrize("ranks", sorted(JOBS))
def test_ranks_give_the_same_tokens_as_one_process(layered_programs, tmp_path, ranks):
    """Greedy tokens, copied and trimmed caches and a padded batch equal one process's, for llama,
    gemma3_text (sliding window) and qwen2_moe; each rank holds a share of the weights."""
    jobs = [(mode, layered_programs[arch]) for mode, arch in JOBS[ranks]]
    out = tmp_path / "results.json"
    done = launch(ranks, SCRIPT, str(out), *(f"{mode}:{path}" for mode, path in jobs))
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout == ""  # only rank 0 writes, and only to its file
    results = json.loads(out.read_text())
    assert len(results) == len(jobs)
    for result, (mode, path) in zip(results, jobs, strict=True):
        expected = reference(path)
        assert result["greedy"] == expected["greedy"], (mode, path.name)
        assert result["copies"] == expected["copies"], (mode, path.name)
        assert result["copies"][0] == result["copies"][1] == result["copies"][2]
        np.testing.assert_allclose(result["batch"], expected["batch"], atol=1e-4)
        np.testing.assert_allclose(result["long"], expected["long"], atol=1e-4)
        if mode == "pipeline":  # a rank that cannot run a step tells rank 0, and the ring goes on
            assert result["refused"].startswith("rank 1 of") and "holds 7 positions but rank 0's holds 14" in \
                result["refused"], result["refused"]
        total = sum(const_bytes(meta) for meta in read_program(path).spec["consts"].values())
        held = result["ranks"]
        print(f"{mode} over {ranks} ranks, {path.name}: weight bytes per rank {held} of {total}")
        assert len(held) == ranks and max(held) < total
        if mode == "pipeline":  # whole layers per rank, balanced: about 1/n each
            assert total <= sum(held) < total * 1.01
            assert max(held) <= total / ranks + total / 4


@pytest.mark.slow
def test_paw_run_over_two_ranks_prints_once(smollm2_program):
    """`mlx.launch -n 2 -- paw run`: rank 0 prints what one process prints (tests/test_smollm2.py
    checks that answer alone); each rank holds half of the 538 MB of weights."""
    done = launch(2, PAW, "run", str(smollm2_program), "--prompt", "What is the capital of France?", timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout == "The capital of France is Paris.\n"
    print(done.stderr)
    assert "pipeline parallel over 2 ranks" in done.stderr
    assert "rank 0: layers 0-10 + output head, weights 269.0 MB" in done.stderr
    assert "rank 1: layers 11-29, weights 269.0 MB" in done.stderr


def test_paw_serve_over_two_ranks_answers_as_one_process(layered_programs):
    """`mlx.launch -n 2 -- paw serve`: rank 0 serves HTTP, each request's rows run over both ranks,
    and greedy answers (several at once, streamed or not) equal one process's."""
    import httpx

    import paw_mlx

    path = layered_programs["llama"]
    alone = paw_mlx.load(path, parallel="none")
    prompts = ["5 17 42", "Hello there", "a b c d e f"]
    want = [paw_mlx.generate(alone, p, raw=True, max_tokens=8) for p in prompts]
    port, ring = free_ports(1)[0], free_port_run(2)
    args = [LAUNCH, "-n", "2", "--backend", "ring", "--starting-port", str(ring), "--python", sys.executable,
            "--", PAW, "serve", str(path), "--port", str(port)]
    server = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=dict(os.environ, PAW_DIST_TIMEOUT="30"), start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            assert server.poll() is None and time.monotonic() < deadline, "the server did not come up"
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.3)
        name = httpx.get(url + "/v1/models", timeout=10).json()["data"][0]["id"]

        def ask(prompt: str, stream: bool = False) -> str:
            body = {"model": name, "prompt": prompt, "max_tokens": 8, "stream": stream}
            if not stream:
                return httpx.post(url + "/v1/completions", json=body, timeout=60).json()["choices"][0]["text"]
            with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as reply:
                events = [line[6:] for line in reply.iter_lines() if line.startswith("data: ")]
            return "".join(json.loads(e)["choices"][0]["text"] for e in events if e != "[DONE]")

        answers: list = [None] * len(prompts)
        threads = [threading.Thread(target=lambda i=i: answers.__setitem__(i, ask(prompts[i])))
                   for i in range(len(prompts))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert answers == want
        assert ask(prompts[0], stream=True) == want[0]
    finally:
        os.killpg(server.pid, signal.SIGINT)
        try:
            _, err = server.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            _, err = server.communicate(timeout=10)
    assert "pipeline parallel over 2 ranks" in err, err[-2000:]


class Ranks:
    """Ranks started directly (as mlx.launch would), so a test can signal one of them."""

    def __init__(self, ranks: int, args: list[str], tmp_path: Path, timeout: float, only: list[int] | None = None):
        hostfile = tmp_path / "hosts.json"
        hostfile.write_text(json.dumps([[f"127.0.0.1:{port}"] for port in free_ports(ranks)]))
        self.procs: dict[int, subprocess.Popen] = {}
        self.errors: dict[int, list[str]] = {}
        self.ready = threading.Event()
        for rank in only if only is not None else range(ranks):
            env = dict(os.environ, MLX_RANK=str(rank), MLX_HOSTFILE=str(hostfile), PAW_DIST_TIMEOUT=str(timeout))
            proc = subprocess.Popen([PAW, *args], env=env, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.PIPE, text=True)
            self.procs[rank] = proc
            self.errors[rank] = []
            threading.Thread(target=self._read, args=(rank, proc), daemon=True).start()

    def _read(self, rank: int, proc: subprocess.Popen) -> None:
        for line in proc.stderr:
            self.errors[rank].append(line.rstrip("\n"))
            if "parallel over" in line:
                self.ready.set()

    def wait(self, seconds: float, only: list[int] | None = None) -> dict[int, int | None]:
        """Exit codes of the ranks (``only`` these), once each has ended; one that outlives ``seconds`` is killed."""
        end = time.monotonic() + seconds
        codes = {}
        for rank, proc in self.procs.items():
            if only is not None and rank not in only:
                continue
            try:
                codes[rank] = proc.wait(timeout=max(0.1, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                codes[rank] = None
        time.sleep(0.2)  # let the readers take the last lines
        return codes


def assert_one_line(errors: list[str], *fragments: str) -> str:
    """The one ``paw: error:`` line among a rank's stderr lines (no traceback, no MLX ring noise)."""
    lines = [line for line in errors if line.startswith("paw: error:")]
    assert len(lines) == 1, errors
    assert all(fragment in lines[0] for fragment in fragments), lines[0]
    assert not any("Traceback" in line or line.startswith("[ring]") for line in errors), errors
    return lines[0]


def family(pid: int) -> list[int]:
    """``pid`` and its children (a rank and its watchdog process)."""
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        children = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    return [pid, *map(int, children)]


def test_dead_frozen_and_missing_ranks_give_one_line_on_every_other_rank(layered_programs, tmp_path):
    """Three runs, ended together. Once all have loaded, rank 1 of 3 is killed (its sockets close),
    or frozen with its watchdog (its sockets stay open and silent, as when a link fails); and a
    rank whose peer never starts. Every other rank says so in one line, within the timeout.

    The 3-rank runs start one after the other: the short timeout also bounds connecting, and
    eight processes importing at once on two cores could leave a rank more than 2 s behind
    its peers (it then gives up connecting, correctly, and the run never loads)."""
    timeout = 2.0
    args = ["run", str(layered_programs["llama"])]
    runs = {}
    start = time.monotonic()
    for name in ("alone", "killed", "frozen"):
        (tmp_path / name).mkdir()
        if name == "alone":
            runs[name] = Ranks(2, [*args, "-p", "Hi"], tmp_path / name, timeout, only=[0])
        else:
            runs[name] = Ranks(3, args, tmp_path / name, timeout)
            assert runs[name].ready.wait(60), runs[name].errors
    signalled = time.monotonic()
    os.kill(runs["killed"].procs[1].pid, signal.SIGKILL)
    frozen = family(runs["frozen"].procs[1].pid)
    for pid in frozen:
        os.kill(pid, signal.SIGSTOP)
    try:
        codes = {name: run.wait(timeout * 4 + 5, only=[0] if name == "alone" else [0, 2])
                 for name, run in runs.items()}
    finally:
        for pid in frozen:
            os.kill(pid, signal.SIGKILL)
        runs["frozen"].wait(5)
    elapsed = time.monotonic() - signalled
    print(codes, f"{elapsed:.1f} s after the signals", {name: run.errors for name, run in runs.items()})
    assert all(code for found in codes.values() for code in found.values()), codes  # each non-zero
    assert elapsed < timeout * 3 + 4
    # a dead rank: rank 0 notices at its next keep-alive ping, rank 2 at once
    assert_one_line(runs["killed"].errors[0], "rank 0 of 3", "lost the connection to another rank")
    assert_one_line(runs["killed"].errors[2], "rank 2 of 3", "lost the connection to another rank")
    # nothing closes, so the first rank to give up is a watchdog's; the other may then see its sockets close
    lines = [assert_one_line(runs["frozen"].errors[rank], f"rank {rank} of 3") for rank in (0, 2)]
    watchdogs = [f"no answer from the other ranks for {timeout:g} s", f"no command from rank 0 for {timeout:g} s"]
    assert any(text in line for text in watchdogs for line in lines), lines
    # a rank alone: its connect watchdog
    assert_one_line(runs["alone"].errors[0], "rank 0 of 2: could not connect to the other ranks within 2 s")
    assert time.monotonic() - start < 90


@pytest.mark.parametrize(("args", "fragment"), [
    (["--parallel", "tensor"], "parallel='tensor' needs several ranks: start paw with mlx.launch"),
    (["--pipeline-shares", "3,x"], "--pipeline-shares takes numbers separated by commas"),
])
def test_parallel_options_without_a_launcher_are_one_line(layered_programs, args, fragment):
    from tests.apps.test_cli import assert_one_line_error, paw

    assert_one_line_error(paw("run", str(layered_programs["llama"]), "-p", "Hi", *args), fragment)
