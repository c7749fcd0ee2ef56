"""The big-model options on the command line: memory to run, kept GGUF blocks, shards, option errors."""

from __future__ import annotations

import json

from apps.inspect_view import program_summary
from tests.apps.test_cli import assert_one_line_error, paw
from tests.tiny_gguf import write_tiny_gguf


def test_inspect_estimates_weights_plus_kv_cache(tiny_program):
    summary = program_summary(tiny_program, context=1000)
    memory = summary["memory"]
    # 2 layers x (keys + values) x 2 kv heads x 16 dims x 4 bytes, for 1024 positions (whole steps of 256)
    assert memory.context == 1024
    assert memory.cache_by_dtype == {"float32": 2 * 2 * 2 * 16 * 4 * 1024}
    assert memory.weights == sum(summary["bytes_by_dtype"].values())
    assert program_summary(tiny_program, batch=3)["memory"].cache == 3 * 512 * 2 * 2 * 2 * 16 * 4
    done = paw("inspect", str(tiny_program), "--context", "1000")
    assert done.returncode == 0, done.stderr
    assert "memory to run" in done.stdout and "1,024 positions" in done.stdout and "KV cache" in done.stdout
    assert_one_line_error(paw("inspect", str(tiny_program), "--context", "0"), "--context")


def test_export_keeps_gguf_blocks_in_shards(tmp_path, tiny_tokenizer):
    import paw_mlx
    from apps.cli import _export

    source = write_tiny_gguf(tmp_path / "tiny.gguf", tiny_tokenizer)
    out = tmp_path / "kept"
    _export(str(source), out, quantize="keep", max_shard_size="40kB")  # the CLI's own parsing of both options
    index = json.loads((out / "consts.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    ops = {node.op for node in paw_mlx.load(out).program.nodes}
    assert "quantized_linear" in ops and "linear" not in ops
    assert isinstance(paw_mlx.generate(paw_mlx.load(out), "Hello", max_tokens=4), str)


def test_impossible_export_options_fail_before_loading(tmp_path):
    import pytest

    from exporter.export import check_options
    from interp.errors import ExportError

    missing_is_fine = str(tmp_path / "model.gguf")  # never opened: the options are checked first
    assert_one_line_error(paw("export", "llama", missing_is_fine, "-o", str(tmp_path / "out"), "--quantize", "7"),
                          "--quantize takes")
    assert not (tmp_path / "out").exists()
    for options, fragment in [({"experts": "some"}, "unknown experts mode"), ({"max_shard_bytes": -1}, "shard"),
                              ({"quantize": "keep", "weights": "ternary"}, "exclusive"),
                              ({"quantize": 4, "group_size": 48}, "group-size")]:
        with pytest.raises(ExportError, match=fragment):
            check_options(**options)
