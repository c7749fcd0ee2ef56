"""Every architecture decodes the same greedy tokens down the Mac (Metal) path as down the CPU path.

Each tiny model of tests/archs.py is loaded twice in one process: once down the CPU
branches and once down the Mac branches (tests/fake_mac.py: the device predicates say
Metal, MLX computes on the CPU, mx.fast attention and RoPE, no CPU-only fast paths),
and both decode greedily through ``generate_step`` (chunked prefill, compiled decode
step) from the same prompt, recording every step's logits.

- float32: the 32 greedy tokens are equal, and every step's logits agree within
  ``TOLERANCE["float32"]`` of the largest |logit|.
- float16 / bfloat16 (exported in that dtype): the two paths round differently (the CPU
  path computes half-precision products in float32 through BLAS, the Mac path in MLX's
  half-precision kernels), so logits agree within ``TOLERANCE[dtype]`` of the largest
  |logit| at every step both paths reached with the same tokens (bfloat16 mixtures of
  experts: ``MOE_BFLOAT16_TOLERANCE``), and the tokens are equal up to the first step
  whose top-two logits on the CPU path are closer than twice that tolerance (a near-tie,
  where either token is a right answer). These exports cost
  about a minute, so they run in the fake-Mac pass only (``PAW_FAKE_MAC=1``, .ci/run).
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from interp.generate import generate_step
from interp.graph import GraphModel
from interp.program import read_program
from interp.sampling import greedy
from tests.archs import ARCHS, VOCAB
from tests.fake_mac import device_path

PROMPT = [int(i) for i in np.random.default_rng(1).integers(3, VOCAB, 8)]
NEW_TOKENS = 32
#: How far the Mac path's logits may be from the CPU path's, relative to the largest |logit|
#: (measured on these models: float16 at most 6e-3, bfloat16 at most 3.5e-2 without experts).
TOLERANCE = {"float32": 1e-5, "float16": 1e-2, "bfloat16": 5e-2}
#: In bfloat16 a mixture of experts' router can pick another expert on the two paths, which
#: moves the logits far more than rounding alone (measured at most 0.12 of the largest |logit|).
MOE_BFLOAT16_TOLERANCE = 0.15
MIXTURES_OF_EXPERTS = ("mixtral", "qwen2_moe")


def _greedy(program_dir, path: str) -> tuple[list[int], np.ndarray]:
    """Greedy tokens and every step's float32 logits [steps, vocab] down ``path``."""
    steps: list[mx.array] = []

    def recording_greedy(logits: mx.array) -> mx.array:
        steps.append(logits)
        return greedy(logits)

    with device_path(path):
        model = GraphModel.from_program(read_program(program_dir))
        tokens = list(generate_step(model, PROMPT, model.make_cache(), sampler=recording_greedy,
                                    max_tokens=NEW_TOKENS))
        logits = np.array(mx.concatenate(steps[: len(tokens)]).astype(mx.float32))
    return tokens, logits


@pytest.mark.not_fake_mac_pass  # compares both paths itself, on the normal pass's shared exports
@pytest.mark.parametrize("arch", list(ARCHS))
def test_float32_mac_path_decodes_the_cpu_path_tokens(arch_program, arch):
    cpu_tokens, cpu_logits = _greedy(arch_program(arch), "cpu")
    mac_tokens, mac_logits = _greedy(arch_program(arch), "metal")
    assert mac_tokens == cpu_tokens
    scale = np.abs(cpu_logits).max()
    assert np.abs(mac_logits - cpu_logits).max() <= TOLERANCE["float32"] * scale


@pytest.mark.fake_mac_pass  # these exports take about a minute: the fake-Mac pass only
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("arch", list(ARCHS))
def test_half_precision_mac_path_agrees_with_the_cpu_path(arch_program, arch, dtype):
    cpu_tokens, cpu_logits = _greedy(arch_program(arch, dtype), "cpu")
    mac_tokens, mac_logits = _greedy(arch_program(arch, dtype), "metal")
    moe = dtype == "bfloat16" and arch in MIXTURES_OF_EXPERTS
    allowed = (MOE_BFLOAT16_TOLERANCE if moe else TOLERANCE[dtype]) * np.abs(cpu_logits).max()
    same = 0  # steps reached by both paths with the same tokens so far
    while same < NEW_TOKENS:
        assert np.abs(mac_logits[same] - cpu_logits[same]).max() <= allowed, f"step {same}"
        top_two = np.sort(cpu_logits[same])[-2:]
        if top_two[1] - top_two[0] < 2 * allowed:
            break  # a near-tie: the paths may pick different tokens from here on
        assert mac_tokens[same] == cpu_tokens[same], f"step {same}"
        same += 1
