"""Every architecture in tests/archs.py exports with no per-model code and matches transformers.

For each tiny random model: full-sequence logits, logits through the KV cache (prefill a
few tokens, then one at a time) and 32 greedy tokens are compared with transformers'
eager forward and its own ``generate``. One export per architecture (the session fixture
``arch_cases``) serves all checks, here and in tests/interp/test_compiled_step.py.

Set PAW_ARCH_RESULTS=path.json to collect each check's outcome and max error there
(scripts/coverage_table.py reads it to build docs/architectures.md).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from tests.archs import ARCHS, NEW_TOKENS, PROMPT_LEN, RECURRENT, SEQ, ArchCase

TOLERANCE = 1e-4
PREFILL = 5

#: Architectures kept out of the green suite, each with the construct that fails.
#: Empty means every architecture in tests/archs.py passes.
KNOWN_FAILURES: dict[str, str] = {}

ARCH_NAMES = [name for name in ARCHS if name not in KNOWN_FAILURES]


def _record(arch: str, check: str, ok: bool, error: float | None = None) -> None:
    path = os.environ.get("PAW_ARCH_RESULTS")
    if not path:
        return
    file = Path(path)
    data = json.loads(file.read_text()) if file.is_file() else {}
    data.setdefault(arch, {})[check] = {"ok": bool(ok), "max_error": error}
    file.write_text(json.dumps(data, indent=1, sort_keys=True))


def _max_error(got: mx.array, want: np.ndarray) -> float:
    return float(np.max(np.abs(np.array(got.astype(mx.float32)) - want)))


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_full_sequence_logits(arch_cases, arch):
    case = arch_cases(arch)
    err = _max_error(case.model(mx.array(case.ids.numpy())), case.logits)
    _record(arch, "logits", err < TOLERANCE, err)
    assert err < TOLERANCE, f"{arch}: logits differ by {err}"


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_cached_decoding_logits(arch_cases, arch):
    case = arch_cases(arch)
    ids = mx.array(case.ids.numpy())
    cache = case.model.make_cache()
    pieces = [case.model(ids[:, :PREFILL], cache=cache)]
    for i in range(PREFILL, SEQ):
        pieces.append(case.model(ids[:, i : i + 1], cache=cache))
    err = _max_error(mx.concatenate(pieces, axis=1), case.logits)
    _record(arch, "cached", err < TOLERANCE, err)
    assert err < TOLERANCE, f"{arch}: cached logits differ by {err}"


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_greedy_tokens_match_generate(arch_cases, arch):
    from interp.generate import generate_step

    case = arch_cases(arch)
    prompt = case.ids[0, :PROMPT_LEN].tolist()
    got = list(generate_step(case.model, prompt, case.model.make_cache(), max_tokens=NEW_TOKENS))
    _record(arch, "greedy", got == case.greedy)
    assert got == case.greedy


def _attention_attrs(case: ArchCase) -> list[dict]:
    spec = json.loads((case.dir / "prog.json").read_text())
    return [node["attrs"] for node in spec["nodes"] if node["op"] == "attention"]


#: What must reach the program's attention ops for the family's special attention to be
#: captured by the op (rather than lost): per-layer windows, soft-caps, ALiBi.
ATTENTION_FEATURES = {
    "mistral": [{"window": 5}, {"window": 5}],
    "ministral": [{"window": 5}, {"window": 0}],
    "qwen2": [{"window": 0}, {"window": 5}],
    "gemma2": [{"window": 5, "softcap": 5.0}, {"window": 0, "softcap": 5.0}],
    "gemma3_text": [{"window": 5}, {"window": 0}],
    "starcoder2": [{"window": 5}, {"window": 5}],
    "exaone4": [{"window": 5}, {"window": 0}],
    "bloom": [{"alibi_max_bias": 8.0}, {"alibi_max_bias": 8.0}],
    "mpt": [{"alibi_max_bias": 8.0}, {"alibi_max_bias": 8.0}],
    "phimoe": [{"window": 5}, {"window": 5}],  # from the mask: PhiMoE passes no sliding_window to the interface
    "gpt_oss": [{"window": 5}, {"window": 0}],
    "llama4_text": [{"chunk": 4, "window": 0}, {"chunk": 0, "window": 0}],  # chunked local layer, NoPE global one
    "diffllama": [{"layer": 0}, {"layer": 1}, {"layer": 2}, {"layer": 3}],  # two calls per layer, a slot each
    "llama": [{"window": 0, "softcap": 0.0}, {"window": 0, "softcap": 0.0}],
    # an indexed layer (its indexer's keys in slot 0), then a sliding one
    "dots3_note_text": [{"layer": 1, "window": 0}, {"layer": 2, "window": 5}],
}


@pytest.mark.parametrize("arch", [a for a in ATTENTION_FEATURES if a in ARCH_NAMES])
def test_attention_features_reach_the_program(arch_cases, arch):
    attrs = _attention_attrs(arch_cases(arch))
    want = ATTENTION_FEATURES[arch]
    assert len(attrs) == len(want)
    for slot, (got, expected) in enumerate(zip(attrs, want, strict=True)):
        assert got["layer"] == expected.get("layer", slot)
        assert {key: got.get(key, 0.0) for key in expected} == expected


@pytest.mark.parametrize("arch", ["gpt_oss", "llama"])
def test_attention_sinks_reach_the_program(arch_cases, arch):
    """gpt-oss's per-head sinks are the attention op's fourth input; other families have none."""
    spec = json.loads((arch_cases(arch).dir / "prog.json").read_text())
    sinks = [node["inputs"][3] for node in spec["nodes"] if node["op"] == "attention"]
    if arch == "gpt_oss":
        assert all(name in spec["consts"] and spec["consts"][name]["shape"] == [4] for name in sinks), sinks
    else:
        assert sinks == [None] * len(sinks)


#: Architectures whose attention tensor parallelism keeps whole (only the MLP splits), and why.
WHOLE_ATTENTION = {"olmo2": "its q/k norms span every head", "olmoe": "its q/k norms span every head",
                   "bloom": "ALiBi's slopes depend on each head's index",
                   "mpt": "ALiBi's slopes depend on each head's index",
                   "deepseek_v2": "its keys join per-head parts with one rotary part every head shares",
                   "deepseek_v3": "its keys join per-head parts with one rotary part every head shares",
                   "deepseek_v32": "its keys join per-head parts with one rotary part every head shares",
                   "glm_moe_dsa": "its keys join per-head parts with one rotary part every head shares",
                   "axk2": "its keys join per-head parts with one rotary part every head shares",
                   "hy_v4": "its keys join per-head parts with one rotary part every head shares",
                   "dots3_note_text": "its keys join per-head parts with one rotary part every head shares",
                   "falcon": "its fused qkv is regrouped: each group's queries beside the group's key and value",
                   "diffllama": "it tiles its value heads for its two attention calls",
                   "jetmoe": "its queries come from routed attention experts (expert_linear), which stay whole"}

#: Architectures tensor parallelism refuses (one DistributedError line), and why.
NOT_TENSOR_PARALLEL = {"gpt_oss": "its sinks keep attention whole (one logit per global head) and every MLP is "
                                  "experts behind a router"}


@pytest.mark.parametrize("arch", RECURRENT)
def test_distributed_execution_refuses_recurrent_programs(arch_cases, arch):
    from interp.distributed.sharding import plan_tensor_parallel
    from interp.distributed.stages import plan_pipeline
    from interp.errors import DistributedError

    program = arch_cases(arch).model.program
    with pytest.raises(DistributedError, match=r"^distributed \(pipeline\) execution does not run programs with "
                                               r"recurrent state: .* keeps a conv state in \d layers"):
        plan_pipeline(program, 2)
    with pytest.raises(DistributedError, match=r"^tensor parallelism does not run programs with recurrent state"):
        plan_tensor_parallel(program, 2)


@pytest.mark.parametrize("arch", [name for name in ARCH_NAMES if name not in RECURRENT])
def test_pipeline_and_tensor_splits_give_the_same_logits(arch_cases, arch):
    """Split over two ranks (simulated in one process), every architecture computes what it does whole."""
    from interp.distributed.sharding import plan_tensor_parallel, probe_shapes
    from tests.interp.distributed.simulate import (
        max_difference,
        pipeline_logits,
        tensor_logits,
        whole_logits,
    )

    program, consts = arch_cases(arch).model.program, arch_cases(arch).model.consts
    expected, feeds = whole_logits(program, consts, arch_cases(arch).ids[0, :PROMPT_LEN].tolist(), steps=2)
    assert max_difference(expected, pipeline_logits(program, consts, 2, feeds)) < TOLERANCE
    if arch in NOT_TENSOR_PARALLEL:
        from interp.errors import DistributedError

        with pytest.raises(DistributedError, match="finds nothing in this program to split"):
            tensor_logits(program, consts, 2, feeds)
        return
    assert max_difference(expected, tensor_logits(program, consts, 2, feeds)) < TOLERANCE
    query = next(node.inputs[0] for node in program.nodes if node.op == "attention")
    heads = probe_shapes(program)[query][1], probe_shapes(plan_tensor_parallel(program, 2).rank_program(0))[query][1]
    assert (heads[1] == heads[0]) == (arch in WHOLE_ATTENTION), heads
