"""Aten ops that lower onto existing program ops give torch's result (the ops architectures outside
tests/archs.py brought: MoE routers' max/scatter, Falcon's negative fancy index, DeepSeek's
new_empty + copy_, Apertus' softplus, ...).

Each case is a small torch function of the token ids, captured with torch.export and run
op by op through the interpreter's node runners, against torch on the same input.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from exporter.lower import lower
from interp.graph import RunContext, _make_node_runner
from interp.program import Node

IDS = torch.tensor([[5, 17, 3, 9, 11, 2], [8, 1, 14, 6, 12, 7]])


def _x(ids: torch.Tensor) -> torch.Tensor:
    """[B, L, 6] floats with ties-free rows, computed in the graph from the ids."""
    return torch.sin(ids.unsqueeze(-1).float() * torch.arange(1, 7).float() * 0.37) * 3


def _deepseek_keys(ids):
    x = _x(ids)
    keys = x.new_empty(*x.shape[:-1], 8)  # written by slices, as DeepSeek-V3's expand_kv does
    keys[..., :6].copy_(x)
    keys[..., 6:].copy_(x[..., :1].expand(-1, -1, 2))
    return keys


def _group_mask(ids):
    scores = _x(ids)
    mask = torch.zeros_like(scores)
    mask.scatter_(-1, torch.topk(scores, 2, dim=-1)[1], 1)  # DeepSeek-V3's group mask
    return scores.masked_fill(~mask.bool(), 0.0)


def _complex_rotary(ids):
    """DeepSeek-V2's rotary: polar angles, pairs viewed as complex, a complex product, back to reals."""
    x = _x(ids)  # [B, L, 6]: three (real, imaginary) pairs
    angles = ids.unsqueeze(-1).float() * torch.tensor([1.0, 0.1, 0.01])  # [B, L, 3]
    freqs = torch.polar(torch.ones_like(angles), angles) * 0.75
    rotated = torch.view_as_complex(x.reshape(*x.shape[:-1], -1, 2)) * freqs.unsqueeze(1).transpose(1, 2).squeeze(2)
    return torch.view_as_real(rotated).flatten(2)


def _complex_shapes(ids):
    """Shape ops, sums, conjugates and parts of complex tensors, axes counted from either end."""
    z = torch.view_as_complex(_x(ids).reshape(2, 6, 3, 2))  # [B, L, 3] complex
    w = torch.complex(_x(ids)[..., :3], -_x(ids)[..., 3:])
    z = torch.cat([z.transpose(0, 1).transpose(1, 0), w.conj_physical()], dim=-1)  # [B, L, 6]
    z = (z - w.repeat(1, 1, 2)) / (ids.unsqueeze(-1).float() + 1) + z.permute(0, -2, 2)[:, 1:2].expand(2, 6, 6) * 2
    z = -z.unsqueeze(-2).select(-2, 0)[..., 1:5].reshape(2, 6, 2, 2).flatten(2)
    z = z * _x(ids)[..., :4].to(torch.complex64)  # a real tensor cast to complex: a zero imaginary part
    return torch.stack([z.real, z.imag, torch.view_as_real(z)[..., 1], z.abs()], dim=-1)


_FREQS = torch.polar(torch.ones(6, 3), torch.arange(18.0).reshape(6, 3) / 5)  # a complex table, as Llama's freqs_cis


def _complex_table(ids):
    return torch.view_as_real(torch.view_as_complex(_x(ids).reshape(2, 6, 3, 2)) * _FREQS[: ids.shape[1]])


def _gaussian_gate(ids):
    """Gemma 3n's gate: a target sparsity made with torch.tensor, its normal quantile (erfinv, computed at export)."""
    x = _x(ids)
    quantile = torch.distributions.normal.Normal(0, 1).icdf(torch.tensor(0.95, dtype=torch.float32))
    return F.relu(x - (x.mean(-1, keepdim=True) + x.std(-1, keepdim=True, unbiased=False) * quantile))


def _interleaved_mrope(ids):
    """Cohere Compass's M-RoPE recomposition: every third frequency of row 0 overwritten from rows 1 and 2
    through a view of row 0 (select_scatter of strided slice_scatters; the last slice runs past the axis)."""
    freqs = torch.stack([_x(ids), _x(ids) * 2, _x(ids) - 1])  # [3, B, L, 6]
    row = freqs[0]
    row[..., 1:6:3] = freqs[1, ..., 1:6:3]
    row[..., 2:60:3] = freqs[2, ..., 2:60:3]
    return freqs


def _rows_written(ids):
    """Rows written through views: the last along a static axis, a negative one, a slice from the end."""
    x = _x(ids).clone()
    x[:, -1] = x[:, 0] * 3
    x.select(2, -2).copy_(x[..., 0])
    x[..., -2:] = x[..., :2] + 5
    return x


_GATES = torch.linspace(-1, 1, 36).reshape(2, 6, 3)  # two blocks of a block-diagonal projection


def _block_gates(ids):
    """RecurrentGemma's gates (baddbmm of a bias per block), and both product ops scaled by beta and alpha."""
    x = _x(ids)  # [B, L, 6] taken as 2 blocks of [L, 6]
    bias = torch.tensor([[[0.5, -1.0, 2.0]], [[1.5, 0.0, -0.5]]])
    return torch.stack([torch.baddbmm(bias, x, _GATES), torch.baddbmm(bias, x, _GATES, beta=0.5, alpha=2.0),
                        torch.baddbmm(bias, x, _GATES, beta=0.0, alpha=-1.0),
                        torch.addmm(bias[0], x[0], _GATES[0], beta=3.0, alpha=0.25).expand(2, 6, 3)])


CASES = {
    "baddbmm and addmm with beta and alpha (RecurrentGemma's gates)": _block_gates,
    "strided slice_scatter and select_scatter (Cohere Compass's M-RoPE)": _interleaved_mrope,
    "select_scatter at negative indices, slice_scatter from the end": _rows_written,
    "complex rotary (DeepSeek-V2)": _complex_rotary,
    "complex shapes and arithmetic": _complex_shapes,
    "a complex constant": _complex_table,
    "max.dim": lambda ids: torch.stack([v.float() for v in _x(ids).max(dim=-1, keepdim=True)]),
    "min.dim": lambda ids: torch.stack([v.float() for v in _x(ids).min(dim=1)]),
    "max and min of all": lambda ids: torch.stack([_x(ids).max(), _x(ids).min()]),
    "scatter.value (PhiMoE)": lambda ids: torch.scatter(_x(ids), -1, _x(ids).max(-1, keepdim=True)[1], float("-inf")),
    "scatter_ on zeros, bitwise_not": _group_mask,
    "scatter along a middle axis": lambda ids: torch.scatter(
        _x(ids), 1, ids[:, :2].clamp(max=5).unsqueeze(-1).expand(-1, -1, 6), 7.0),
    "scatter.src of top-k scores into -inf (Llama 4's router)": lambda ids: torch.full_like(_x(ids), float("-inf"))
    .scatter_(-1, _x(ids).topk(2, dim=-1)[1], _x(ids).topk(2, dim=-1)[0]).sigmoid(),
    "scatter.src along a middle axis": lambda ids: torch.scatter(
        _x(ids), 1, torch.tensor([[0, 1, 2, 3, 4, 5], [3, 4, 5, 0, 1, 2]]).expand(2, 2, 6), -_x(ids)[:, :2]),
    "log1p of small values": lambda ids: torch.log1p(_x(ids) * 1e-7),
    "clamp with a tensor bound": lambda ids: _x(ids).clamp(min=_x(ids).amax(-1, keepdim=True) - 2),
    "softplus": lambda ids: F.softplus(_x(ids) * 10),
    "softplus with beta": lambda ids: F.softplus(_x(ids), beta=2.0),
    "expm1": lambda ids: torch.expm1(_x(ids)),
    "min.other and max.other": lambda ids: torch.min(_x(ids), _x(ids) * 0.5) + torch.max(_x(ids), -_x(ids)),
    "unbind": lambda ids: sum(t * (i + 1) for i, t in enumerate(_x(ids).unbind(-1))),
    "index with a negative list (Falcon)": lambda ids: _x(ids)[:, :, [-2, 0]],
    "index by position (a table)": lambda ids: torch.cos(torch.arange(40).float()).unsqueeze(-1)[ids],
    "new_empty and slice copy_ (DeepSeek-V3)": _deepseek_keys,
    "concat": lambda ids: torch.concat([_x(ids), -_x(ids)], dim=-1),
    "alias spellings": lambda ids: torch.multiply(_x(ids), 2) - torch.subtract(_x(ids), 1) * torch.greater(_x(ids), 0),
    "floor": lambda ids: torch.floor(_x(ids)),
    "vector norms (DBRX's router)": lambda ids: torch.stack([
        torch.norm(_x(ids), p=1, dim=-1, keepdim=True).expand(-1, -1, 6),
        torch.linalg.vector_norm(_x(ids), dim=1).unsqueeze(1).expand(2, 6, 6),
        torch.linalg.vector_norm(_x(ids), ord=3, dim=(0, 1)).expand(2, 6, 6),
        torch.linalg.vector_norm(_x(ids), ord=float("inf"), dim=-1, keepdim=True).expand(-1, -1, 6)]),
    "std and var": lambda ids: torch.stack([
        _x(ids).std(-1, keepdim=True, unbiased=False).expand(-1, -1, 6),
        _x(ids).var(dim=1, keepdim=True).expand(-1, 6, -1),
        torch.std(_x(ids), dim=(0, 1), correction=2).expand(2, 6, 6),
        torch.var(_x(ids) * 2, dim=[-1], correction=0).unsqueeze(-1).expand(-1, -1, 6)]),
    "a constant made in the forward, turned through erfinv (Gemma 3n's sparse gate)": _gaussian_gate,
}


class _Wrap(torch.nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, input_ids, position_ids):
        return self.fn(input_ids)


def _run_lowered(fn) -> np.ndarray:
    pos = torch.arange(IDS.shape[1]).expand_as(IDS)
    exported = torch.export.export(_Wrap(fn), (IDS, pos)).run_decompositions({})
    low, outputs = lower(exported, strip_prefix="")
    env = {"input_ids": mx.array(IDS.numpy()), "position_ids": mx.array(pos.numpy()),
           **{name: mx.array(t.numpy()) for name, t in low.consts.items()}}
    ctx = RunContext(cache=None)
    for index, raw in enumerate(low.nodes):
        node = Node(raw["op"], tuple(raw["inputs"]), dict(raw["attrs"]), tuple(raw["outputs"]))
        _make_node_runner(index, node)(env, ctx)
    return np.array(env[outputs[0]].astype(mx.float32))


@pytest.mark.parametrize("name", sorted(CASES))
def test_lowering_matches_torch(name):
    fn = CASES[name]
    want = fn(IDS).float().numpy()
    got = _run_lowered(fn)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


class _Rewrites(torch.nn.Module):
    """A buffer the forward overwrites from its inputs (Phi-3's longrope) or advances (state)."""

    def __init__(self, advance: bool):
        super().__init__()
        self.register_buffer("freq", torch.ones(3), persistent=False)
        self.advance = advance

    def forward(self, input_ids, position_ids):
        new = self.freq + 1 if self.advance else torch.where(position_ids.max() > 4, 2.0, 0.5) * torch.ones(3)
        self.freq.copy_(new)
        return input_ids.float().unsqueeze(-1) * self.freq


def test_a_buffer_rewritten_from_the_inputs_is_dropped_and_state_is_refused():
    from interp.errors import ExportError

    pos = torch.arange(IDS.shape[1]).expand_as(IDS)
    exported = torch.export.export(_Rewrites(advance=False), (IDS, pos)).run_decompositions({})
    assert len(exported.graph_signature.output_specs) == 2
    low, outputs = lower(exported, strip_prefix="")
    assert len(outputs) == 1
    stateful = torch.export.export(_Rewrites(advance=True), (IDS, pos)).run_decompositions({})
    with pytest.raises(ExportError, match="updates buffer freq from its previous value"):
        lower(stateful, strip_prefix="")


def test_an_op_on_complex_tensors_without_a_lowering_is_refused_by_name():
    from interp.errors import ExportError

    def exp_of_complex(ids):
        return torch.view_as_real(torch.exp(torch.view_as_complex(_x(ids).reshape(2, 6, 3, 2))))

    pos = torch.arange(IDS.shape[1]).expand_as(IDS)
    exported = torch.export.export(_Wrap(exp_of_complex), (IDS, pos)).run_decompositions({})
    with pytest.raises(ExportError, match=r"^cannot export: op aten.exp.default on complex tensors \(graph node exp"):
        lower(exported, strip_prefix="")
