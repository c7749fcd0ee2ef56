"""`paw bench` smoke run: a tiny model, a few tokens, every part of the report produced."""

from __future__ import annotations

import json

import pytest

from interp import device
from tests.child_env import child_env
from tests.fake_mac import REAL_CUDA, REAL_METAL
from tests.tiny import make_tokenizer, tiny_llama_config, tiny_model


@pytest.fixture(scope="module")
def tiny_hf_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bench") / "tiny-hf"
    tiny_model(tiny_llama_config(hidden_size=64, intermediate_size=128)).save_pretrained(str(folder))
    make_tokenizer().save_pretrained(str(folder))
    return folder


def test_bench_smoke_writes_table_json_and_docs(tiny_hf_folder, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from apps.cli import app

    monkeypatch.setenv("PAW_BENCH_CACHE", str(tmp_path / "cache"))
    docs = tmp_path / "benchmarks.md"
    docs.write_text("# Benchmarks\n\n<!-- bench:start -->\nold\n<!-- bench:end -->\n\nafter\n")
    results = tmp_path / "results"
    out = CliRunner().invoke(app, ["bench", str(tiny_hf_folder), "--dtypes", "float32", "--engines",
                                   "paw,mlx-lm,mlx-lm-stock,ceiling,export", "--prompt-tokens", "8",
                                   "--decode-tokens", "4", "--device", "cpu", "--rounds", "1",
                                   "--results", str(results), "--docs", str(docs)])
    assert out.exit_code == 0, out.output
    assert "paw bench" in out.output and "mlx-lm" in out.output  # the rich table
    report = json.loads((results / "latest.json").read_text())
    rows = {row["engine"]: row for row in report["rows"]}
    assert set(rows) == {"paw", "mlx-lm", "mlx-lm-stock", "ceiling", "export"}
    assert not any("error" in row for row in rows.values()), rows
    for engine in ("paw", "mlx-lm", "mlx-lm-stock"):
        row = rows[engine]
        assert row["generated"] == 4 and row["decode_tps"] > 0 and row["ttft_s"] > 0
        assert row["peak_memory_gb"] > 0 and row["load_s"] > 0
    assert [len(row["rounds"]) for row in rows.values()] == [1] * 5  # rounds: test_rounds_alternate_...
    assert rows["ceiling"]["weight_bytes"] > 0 and rows["ceiling"]["decode_tps"] > 0
    # The export row is a real `paw export` of the source, timed and then removed.
    assert rows["export"]["export_s"] > 0 and rows["export"]["program_gb"] > 0
    assert not list((tmp_path / "cache").rglob(".export-*"))
    # Same weights, same greedy decoding: paw's tokens are mlx-lm's.
    assert rows["paw"]["same_tokens_as_mlx_lm"] == 4
    assert {"decode_vs_mlx_lm", "prefill_vs_mlx_lm", "memory_vs_mlx_lm", "decode_vs_ceiling"} <= set(rows["paw"])
    assert report["machine"]["device"] == "cpu" and report["config"]["prompt_tokens"] == 8
    assert {row["device"] for row in rows.values() if "decode_tps" in row} == {"cpu"}
    if device.needs_blas_shim():  # the stock engine really runs on MLX's bundled BLAS
        assert rows["paw"]["blas"] == rows["mlx-lm"]["blas"] == report["machine"]["blas"]
        assert report["machine"]["blas"].startswith("OpenBLAS")
        assert rows["mlx-lm-stock"]["blas"] == "reference (PAW_BLAS=reference)"
    assert "decode_vs_mlx_lm" not in rows["mlx-lm-stock"] and "decode_vs_ceiling" not in rows["mlx-lm-stock"]
    page = docs.read_text()
    assert "old" not in page and "| float32 | paw |" in page and page.endswith("after\n")
    assert (results / "latest.md").read_text().count("| float32 |") == 5


def test_rounds_alternate_the_engine_order_and_rows_keep_every_round(tiny_hf_folder, tmp_path, monkeypatch):
    """``paw bench`` runs two rounds by default, the second in reverse order, and each row is the best of
    its engine's rounds (the workers stood in: the smoke run above starts real ones, for one round)."""
    from typer.testing import CliRunner

    from apps.benchmarks import harness
    from apps.cli import app

    monkeypatch.setenv("PAW_BENCH_CACHE", str(tmp_path / "cache"))
    order = []

    def engine(name, path, dtype, config):
        order.append(name)
        return {"ttft_s": 1.0 + len(order), "decode_tps": 10.0 * len(order), "load_s": 0.1,
                "peak_memory_gb": len(order) / 8, "tokens": [1, 2]}

    def export(variant, config, root):
        order.append("export")
        return {"export_s": float(len(order)), "program_gb": 0.01}

    monkeypatch.setattr(harness, "run_engine", engine)
    monkeypatch.setattr(harness, "run_export", export)
    monkeypatch.setattr(harness, "_paths", lambda variant, engine, *rest: tmp_path)
    results = tmp_path / "results"
    out = CliRunner().invoke(app, ["bench", str(tiny_hf_folder), "--dtypes", "float32", "--engines",
                                   "paw,mlx-lm,export", "--device", "cpu", "--results", str(results)])
    assert out.exit_code == 0, out.output
    assert order == ["paw", "mlx-lm", "export", "export", "mlx-lm", "paw"]
    rows = {row["engine"]: row for row in json.loads((results / "latest.json").read_text())["rows"]}
    assert [len(row["rounds"]) for row in rows.values()] == [2] * 3
    assert (rows["paw"]["decode_tps"], rows["paw"]["ttft_s"], rows["paw"]["peak_memory_gb"]) == (60.0, 2.0, 0.75)
    assert rows["export"]["export_s"] == 3.0


def test_best_of_rounds_keeps_best_timings_and_worst_memory():
    from apps.benchmarks.harness import best_of

    runs = [{"ttft_s": 2.0, "decode_tps": 10.0, "load_s": 0.5, "peak_memory_gb": 0.30, "tokens": [1, 2]},
            {"ttft_s": 1.5, "decode_tps": 9.0, "load_s": 0.7, "peak_memory_gb": 0.31, "tokens": [1, 2]}]
    row = best_of(runs)
    assert (row["ttft_s"], row["decode_tps"], row["load_s"], row["peak_memory_gb"]) == (1.5, 10.0, 0.5, 0.31)
    assert row["rounds"] == [{"ttft_s": 2.0, "decode_tps": 10.0}, {"ttft_s": 1.5, "decode_tps": 9.0}]
    assert "tokens_differ_between_rounds" not in row
    assert best_of([runs[0], {**runs[1], "tokens": [1, 3]}])["tokens_differ_between_rounds"]
    assert best_of([runs[0], {"error": "exit 1: boom"}]) == {"error": "exit 1: boom"}


def test_stock_rows_are_held_against_the_stock_ceiling_and_mlx_lm():
    from apps.benchmarks.harness import _add_ratios

    def generation(tps):
        return {"decode_tps": tps, "ttft_s": 1.0, "peak_memory_gb": 0.5}

    rows = [{"dtype": "float32", "engine": "paw", **generation(16.0)},
            {"dtype": "float32", "engine": "mlx-lm", **generation(8.0)},
            {"dtype": "float32", "engine": "ceiling", "decode_tps": 32.0},
            {"dtype": "float32", "engine": "paw-stock", **generation(12.0)},
            {"dtype": "float32", "engine": "mlx-lm-stock", **generation(10.0)},
            {"dtype": "float32", "engine": "ceiling-stock", "decode_tps": 15.0},
            {"dtype": "float32", "engine": "export", "export_s": 30.0}]
    _add_ratios(rows)
    paw, paw_stock = rows[0], rows[3]
    assert (paw["decode_vs_mlx_lm"], paw["decode_vs_ceiling"]) == (2.0, 0.5)
    assert (paw_stock["decode_vs_mlx_lm"], paw_stock["decode_vs_ceiling"]) == (1.2, 0.8)
    assert "decode_vs_ceiling" not in rows[2] and "decode_vs_ceiling" not in rows[6]


def test_gpu_results_are_named_after_their_backend(tmp_path):
    from apps.benchmarks.harness import write_results

    report = {"started": "2026-11-24 10:00:00", "config": {"prompt_tokens": 8, "decode_tokens": 4, "src": "x"},
              "machine": {"processor": "Apple M3", "cpus": 8, "machine": "arm64", "mlx": "0.32.4", "device": "metal",
                          "device_description": "the GPU (Metal)", "metal": True, "blas": "platform default",
                          "mlx_lm": "0.32.2", "torch": "-", "transformers": "-", "load_average": [1.0]},
              "rows": [{"dtype": "float32", "engine": "paw", "ttft_s": 0.1, "decode_tps": 100.0}]}
    json_path, md_path = write_results(report, tmp_path)
    assert json_path.name == "bench-2026-11-24_100000-metal.json" and md_path.suffix == ".md"
    assert (tmp_path / "latest-metal.json").is_file() and not (tmp_path / "latest.json").exists()
    assert "MLX 0.32.4 on the GPU (Metal), mlx-lm" in (tmp_path / "latest-metal.md").read_text()
    report["machine"]["tf32"] = True  # a run started with MLX_ENABLE_TF32=1 says so in its table
    _, md_path = write_results(report, tmp_path)
    assert "MLX 0.32.4 on the GPU (Metal), float32 products in TF32, mlx-lm" in md_path.read_text()


@pytest.mark.skipif(REAL_METAL or REAL_CUDA, reason="this machine has a GPU")
def test_bench_on_a_missing_gpu_is_one_line_before_any_work(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    env = child_env(root, PAW_BENCH_CACHE=str(tmp_path / "cache"))
    done = subprocess.run([sys.executable, "-m", "apps.cli", "bench", "--device", "gpu", "--results",
                           str(tmp_path / "results")], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines() == [done.stderr.strip()]
    assert done.stderr.startswith("paw: error: no GPU") and "--device cpu" in done.stderr
    assert not (tmp_path / "cache").exists() and not (tmp_path / "results").exists()
