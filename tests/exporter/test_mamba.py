"""The Mamba 1 replacements (exporter/mamba.py) compute what transformers' own functions do.

The recipe swaps ``causal_conv1d_fn`` and ``mamba_selective_scan`` in the Mamba, Falcon-Mamba, Jamba
and Zamba modeling modules for calls to the paw ops; on whole sequences from no state they must give
transformers' results (its sequential scan, what its forward runs without the mamba_ssm kernels).
"""

from __future__ import annotations

import pytest
import torch
from transformers.models.falcon_mamba import modeling_falcon_mamba
from transformers.models.jamba import modeling_jamba
from transformers.models.mamba import modeling_mamba
from transformers.models.zamba import modeling_zamba

from exporter import mamba
from interp.errors import ExportError

B, D, L, N = 2, 6, 9, 4


def _inputs():
    """Channels-first x, dt and z [B, D, L]; A [D, N] (negative); B, C [B, N, L]; D [D]; dt's bias [D]."""
    gen = torch.Generator().manual_seed(0)
    x, dt, z = (torch.randn(B, D, L, generator=gen) for _ in range(3))
    A = -torch.rand(D, N, generator=gen) * 2 - 0.1
    Bs, Cs = (torch.randn(B, N, L, generator=gen) for _ in range(2))
    return x, dt, A, Bs, Cs, torch.randn(D, generator=gen), torch.randn(D, generator=gen)


@pytest.mark.parametrize("module", [modeling_mamba, modeling_falcon_mamba, modeling_jamba, modeling_zamba])
@pytest.mark.parametrize("gated", [True, False])
def test_the_scan_gives_transformers_results(module, gated):
    """With dt's bias and softplus, the D skip and (or not) the silu gate, as the mixers call it."""
    x, dt, A, Bs, Cs, skip, bias = _inputs()
    z = torch.randn(B, D, L, generator=torch.Generator().manual_seed(1)) if gated else None
    options = dict(D=skip, z=z, delta_bias=bias, delta_softplus=True)
    want = module.mamba_selective_scan(x, dt, A, Bs, Cs, use_associative_scan=False, **options)
    got = mamba.selective_scan(x, dt, A, Bs, Cs, **options)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_the_recipe_replaces_what_each_mixer_calls():
    """Each family's modeling module defines both functions the recipe swaps (a rename would leave the
    mixer calling transformers' scan, which capture cannot hold)."""
    from exporter.recipes import RECIPES

    for model_type, module in (("mamba", modeling_mamba), ("falcon_mamba", modeling_falcon_mamba),
                               ("jamba", modeling_jamba), ("zamba", modeling_zamba)):
        assert all(hasattr(module, name) for name in RECIPES[model_type].functions), model_type


def test_a_scan_asked_for_its_state_is_refused():
    x, dt, A, Bs, Cs, _, _ = _inputs()
    with pytest.raises(ExportError, match="asked for its state"):
        mamba.selective_scan(x, dt, A, Bs, Cs, return_last_state=True)
