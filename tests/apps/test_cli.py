"""The CLI end to end on a tiny program: generation, seed-compatible ids files, inspect,
and bad input answered with one line and a non-zero exit (never a traceback)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import paw_mlx
from tests.child_env import child_env

ROOT = Path(__file__).parents[2]
#: a command's row in `paw --help`
COMMAND_LINE = re.compile(r"│ ([a-z][a-z-]+) {2,}")


def paw(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "apps.cli", *args], capture_output=True, text=True, cwd=ROOT,
                          input=stdin, timeout=300)


def assert_one_line_error(done: subprocess.CompletedProcess, *fragments: str) -> None:
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("paw: error: "), lines[0]
    assert "Traceback" not in done.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.fixture
def program_copy(tiny_program, tmp_path):
    target = tmp_path / "prog"
    shutil.copytree(tiny_program, target)
    return target


def test_run_streams_text_and_writes_output_ids(tiny_program, tmp_path):
    out_ids = tmp_path / "output_ids.txt"
    done = paw("run", str(tiny_program / "prog.json"), "--prompt", "Hello", "--max-tokens", "8",
               "--output-ids", str(out_ids))
    assert done.returncode == 0, done.stderr
    ids = [int(t) for t in out_ids.read_text().split()]
    assert 1 <= len(ids) <= 8
    decoded = paw("decode", str(out_ids), "--program", str(tiny_program))
    assert decoded.returncode == 0
    assert decoded.stdout.strip() == done.stdout.strip()


def test_prompt_ids_file_gives_the_same_tokens_as_python(tiny_program, tmp_path):
    import paw_mlx

    prompt = tmp_path / "prompt_ids.txt"
    prompt.write_text("1 335 201 74 75 2 201 1 67 330 378 201\n")
    out_ids = tmp_path / "output_ids.txt"
    done = paw("run", str(tiny_program), "--prompt-ids", str(prompt), "--output-ids", str(out_ids), "-n", "6")
    assert done.returncode == 0, done.stderr
    prog = paw_mlx.load(tiny_program)
    expected = list(paw_mlx.stream_tokens(prog, [1, 335, 201, 74, 75, 2, 201, 1, 67, 330, 378, 201], max_tokens=6))
    assert [int(t) for t in out_ids.read_text().split()] == expected


def test_help_lists_every_command_in_the_order_a_user_meets_them():
    done = paw("--help")
    assert done.returncode == 0, done.stderr
    listed = [m.group(1) for m in map(COMMAND_LINE.match, done.stdout.splitlines()) if m]
    assert listed == ["export", "run", "chat", "inspect", "decode", "compile", "call", "eval-programs", "serve",
                      "bench"]


def test_help_paragraphs_wrap_at_the_terminal_not_at_the_source():
    """A docstring paragraph wrapped in the source is one line on a wide terminal (it kept
    the source's breaks: "split over them and" ended a line)."""
    done = subprocess.run([sys.executable, "-m", "apps.cli", "run", "--help"], capture_output=True, text=True,
                          cwd=ROOT, timeout=300, env={**os.environ, "COLUMNS": "240"})
    assert done.returncode == 0, done.stderr
    assert any("split over them and only rank 0 prints" in line for line in done.stdout.splitlines())


def test_run_does_not_import_torch(tiny_program):
    code = (
        "import sys\n"
        f"sys.argv = ['paw', 'run', {str(tiny_program)!r}, '--prompt', 'Hi', '-n', '3']\n"
        "from apps.cli import main\n"
        "main()\n"
        "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH')\n"
        "print('TRANSFORMERS' if 'transformers' in sys.modules else 'NO-TRANSFORMERS')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "NO-TORCH" in done.stdout
    assert "NO-TRANSFORMERS" in done.stdout


@pytest.mark.parametrize(("argv", "blocked", "extra"), [
    (["export", "llama", "smollm2", "-o", "out"], "torch", "export"),
    (["serve", "nowhere"], "fastapi", "serve"),
])
def test_a_missing_extra_names_the_install_from_the_checkout(tmp_path, argv, blocked, extra):
    """paw is installed from its checkout; `pip install 'paw[serve]'` would fetch an unrelated
    PyPI project named paw."""
    code = (
        "import sys\n"
        f"sys.modules[{blocked!r}] = None\n"  # as if the extra were not installed
        f"sys.argv = ['paw', *{argv!r}]\n"
        "from apps.cli import main\n"
        "main()\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=300,
                          env=child_env())
    assert_one_line_error(done, f"pip install -e '.[{extra}]' in paw's checkout")


def test_inspect_shows_histogram_and_fingerprint(tiny_program):
    done = paw("inspect", str(tiny_program), "--verify")
    assert done.returncode == 0, done.stderr
    manifest = json.loads((tiny_program / "manifest.json").read_text())
    assert manifest["fingerprint"] in done.stdout
    assert "attention" in done.stdout and "linear" in done.stdout
    assert "verified" in done.stdout


def test_inspect_says_what_a_compiled_program_holds(tiny_program, tmp_path):
    """A few-shot program's prefix holds its examples: `paw inspect` says so (it used to say
    "tuning: none (spec only)"), with the kept candidate and the output constraint."""
    from paw_mlx.programs.select import SelectOptions

    rows = [{"input": w, "output": w.upper()} for w in ["cat", "dog", "sun", "red"]]
    paw_mlx.compile("Upper.", base=tiny_program, examples=rows, out_dir=tmp_path / "upper",
                    options=SelectOptions(candidates=("fewshot",), folds=2), returns={"regex": "[A-Z]+"})
    done = paw("inspect", str(tmp_path / "upper"))
    assert done.returncode == 0, done.stderr
    text = " ".join(done.stdout.split())
    assert "kept candidate: fewshot; 4 demonstrations in the prefix; tuning: none; adapter: none" in text
    assert 'output constraint: {"regex": "[A-Z]+"}' in text and "spec only" not in text


def test_missing_path(tmp_path):
    assert_one_line_error(paw("run", str(tmp_path / "nowhere"), "--prompt", "x"), "no such file or directory")


def test_directory_that_is_not_a_program(tmp_path):
    assert_one_line_error(paw("run", str(tmp_path), "--prompt", "x"), "not a program directory")


def test_unknown_format_version(program_copy):
    spec_path = program_copy / "prog.json"
    spec = json.loads(spec_path.read_text())
    spec["version"] = 99
    spec_path.write_text(json.dumps(spec))
    assert_one_line_error(paw("run", str(program_copy), "--prompt", "x"), "version 99", "reads version 1")


def test_unknown_op_is_named(program_copy):
    spec_path = program_copy / "prog.json"
    spec = json.loads(spec_path.read_text())
    spec["nodes"][3]["op"] = "frobnicate"
    spec_path.write_text(json.dumps(spec))
    assert_one_line_error(paw("run", str(program_copy), "--prompt", "x"), "'frobnicate'")


def test_truncated_weights(program_copy):
    consts = program_copy / "consts.safetensors"
    data = consts.read_bytes()
    consts.write_bytes(data[: len(data) // 2])
    assert_one_line_error(paw("run", str(program_copy), "--prompt", "x"), "truncated")


def test_nan_weights_are_refused_not_run(program_copy):
    from safetensors.numpy import load_file, save_file

    consts = load_file(program_copy / "consts.safetensors")
    consts["lm_head.weight"][3, 5] = float("nan")  # one value is enough to make every logit NaN
    save_file(consts, program_copy / "consts.safetensors")
    assert_one_line_error(paw("run", str(program_copy), "--prompt", "x"), "'lm_head.weight' holds NaN")


def test_const_shape_mismatch_is_reported(program_copy):
    spec_path = program_copy / "prog.json"
    spec = json.loads(spec_path.read_text())
    name = next(iter(spec["consts"]))
    spec["consts"][name]["shape"][0] += 1
    spec_path.write_text(json.dumps(spec))
    assert_one_line_error(paw("inspect", str(program_copy)), name)


def test_bad_ids_file(tiny_program, tmp_path):
    bad = tmp_path / "ids.txt"
    bad.write_text("1 2 three")
    assert_one_line_error(paw("run", str(tiny_program), "--prompt-ids", str(bad)), "integers")


def test_a_prompt_that_is_not_valid_unicode(tiny_program):
    # undecodable bytes in argv arrive as lone surrogates (surrogateescape), as JSON's "\\ud800" does
    assert_one_line_error(paw("run", str(tiny_program), "-p", "ab\udcff", "-n", "2"), "unpaired surrogate (U+DCFF)")


@pytest.mark.parametrize("args, fragment", [
    (["chat", "{missing}"], "no such file or directory"),
    (["chat", "{tiny}", "-n", "0"], "max_tokens must be at least 1"),
    (["chat", "{tiny}", "-t", "nan"], "temperature"),
    (["chat", "{tiny}", "--no-think"], "has no enable_thinking switch"),
    (["run", "{tiny}", "-p", "hi", "-n", "-1"], "--max-tokens must be at least 0"),
])
def test_bad_options_are_one_line_before_any_work(tiny_program, tmp_path, args, fragment):
    """Before the chat app starts (it would wait for a terminal) and before a run prints nothing."""
    args = [a.format(missing=tmp_path / "missing", tiny=tiny_program) for a in args]
    done = subprocess.run([sys.executable, "-m", "apps.cli", *args], capture_output=True, text=True, cwd=ROOT,
                          stdin=subprocess.DEVNULL, timeout=60)
    assert_one_line_error(done, fragment)


def test_export_of_a_missing_source(tmp_path):
    done = paw("export", "llama", str(tmp_path / "missing.gguf"), "-o", str(tmp_path / "out"))
    assert_one_line_error(done, "no such GGUF file")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("option, value, fragment", [
    ("--quantize", "\u00b2", "--quantize takes"),  # "²".isdigit() is true, int("²") a ValueError
    ("--max-shard-size", "9" * 400 + "GB", "--max-shard-size is too large"),  # float('9' * 400) is inf
])
def test_export_options_out_of_any_range_are_one_line(tmp_path, option, value, fragment):
    done = paw("export", "hf", str(tmp_path / "missing.gguf"), "-o", str(tmp_path / "out"), option, value)
    assert_one_line_error(done, fragment)
    assert not (tmp_path / "out").exists()


def test_an_output_that_is_or_holds_the_source_is_refused_even_with_force(tmp_path, program_copy):
    # --force replaced the source model folder (or the base program) with the output
    source = tmp_path / "model"
    source.mkdir()
    (source / "config.json").write_text("{}")
    for out in (source, tmp_path):
        done = paw("export", "hf", str(source), "-o", str(out), "--force")
        assert_one_line_error(done, f"cannot write {out}: it ", f"{source}, which this command reads")
    done = paw("compile", "Copy.", "-o", str(program_copy), "--base", str(program_copy), "--force")
    assert_one_line_error(done, f"cannot write {program_copy}: it is {program_copy}")
    assert (source / "config.json").read_text() == "{}" and (program_copy / "prog.json").is_file()


def test_export_of_a_folder_without_config(tmp_path):
    (tmp_path / "model").mkdir()
    done = paw("export", "llama", str(tmp_path / "model"), "-o", str(tmp_path / "out"))
    assert_one_line_error(done, "no config.json")
    assert not (tmp_path / "out").exists()


def test_debug_shows_the_cause_of_a_wrapped_error(tmp_path, monkeypatch, capsys):
    """PAW_DEBUG=1 prints the traceback with its cause chain (here transformers' error), then the one line.

    In process: the suite has torch loaded already, so this costs milliseconds.
    """
    from apps.cli import main

    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text('{"model_type": "nosuch"}')
    monkeypatch.setenv("PAW_DEBUG", "1")
    monkeypatch.setattr(sys, "argv", ["paw", "export", "hf", str(tmp_path / "model"), "-o", str(tmp_path / "out")])
    with pytest.raises(SystemExit) as exited:
        main()
    err = capsys.readouterr().err
    assert exited.value.code == 1
    assert "The above exception was the direct cause of the following exception" in err
    assert "ValueError: The checkpoint you are trying to load has model type `nosuch`" in err
    assert "SourceError: could not load" in err
    assert err.strip().splitlines()[-1].startswith("paw: error: could not load")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("config", [
    {"model_type": "llama", "hidden_size": "wide"},
    {"model_type": "llama", "num_hidden_layers": -3, "vocab_size": 10},
    {"model_type": "gpt2", "n_embd": [1, 2]},
])
def test_a_malformed_config_is_one_source_error(tmp_path, monkeypatch, capsys, config):
    from apps.cli import main

    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text(json.dumps(config))
    monkeypatch.setattr(sys, "argv", ["paw", "export", "hf", str(tmp_path / "model"), "-o", str(tmp_path / "out")])
    with pytest.raises(SystemExit) as exited:
        main()
    err = capsys.readouterr().err  # progress lines, then the error
    assert exited.value.code == 1 and "Traceback" not in err
    assert [line for line in err.splitlines() if "error" in line] == [err.strip().splitlines()[-1]]
    assert err.strip().splitlines()[-1].startswith("paw: error: ")
    assert not (tmp_path / "out").exists()


def test_help_teaches():
    done = paw("--help")
    assert done.returncode == 0
    for command in ("export", "run", "decode", "inspect"):
        assert command in done.stdout


def test_a_reply_cut_inside_a_character_ends_before_it(tiny_program):
    """The one token allowed is the first byte of a four-byte character: `paw run` and
    `paw_mlx.generate` print nothing for it, not U+FFFD."""
    from interp.token_bytes import _byte_level_decoder

    prog = paw_mlx.load(tiny_program)
    lead = prog.tokenizer.token_to_id({b: ch for ch, b in _byte_level_decoder().items()}[0xF0])
    assert prog.tokenizer.decode([lead]) == "\ufffd"
    assert paw_mlx.generate(prog, "Hello", raw=True, max_tokens=1, logit_bias={lead: 100}) == ""
    done = paw("run", str(tiny_program), "--prompt", "Hello", "--raw", "--max-tokens", "1",
               "--logit-bias", f"{lead}=100")
    assert done.returncode == 0, done.stderr
    assert "\ufffd" not in done.stdout and done.stdout.strip() == ""


@pytest.mark.parametrize("args, fragment", [
    (["run", "{tiny}", "--prompt-ids", "/dev/null"], "/dev/null is a device, FIFO or socket; the ids file must be"),
    (["compile", "x", "-o", "{out}", "--base", "{tiny}", "--examples", "{fifo}"],
     "fifo is a device, FIFO or socket; the examples file must be a regular file"),
    (["export", "program", "{fifo}", "-o", "{out}", "--base", "{tiny}"], "fifo is a device, FIFO or socket"),
    (["decode", "{fifo}", "-p", "{tiny}"], "fifo is a device, FIFO or socket; the ids file must be"),
])
def test_a_device_or_fifo_where_a_file_is_read_is_named_as_such(tiny_program, tmp_path, args, fragment):
    """These said "no such ids file: /dev/null" about a path that exists."""
    os.mkfifo(tmp_path / "fifo")
    args = [a.format(tiny=tiny_program, out=tmp_path / "out", fifo=tmp_path / "fifo") for a in args]
    assert_one_line_error(paw(*args), fragment)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", [["run", "{tiny}", "-n", "1"], ["call", "{tiny}"]])
def test_stdin_without_end_is_refused_not_read_until_memory_runs_out(tiny_program, command):
    """`paw run PROGRAM < /dev/zero` read until the machine ran out of memory (here: the 4 GB cap)."""
    from tests.fuzzing import _limit_resources

    with open("/dev/zero", "rb") as zeros:
        args = [a.format(tiny=tiny_program) for a in command]
        outcome = subprocess.run([sys.executable, "-m", "apps.cli", *args], stdin=zeros, capture_output=True,
                                 text=True, cwd=ROOT, timeout=120, preexec_fn=_limit_resources)
    assert_one_line_error(outcome, "on stdin is longer than 64 Mi characters")
