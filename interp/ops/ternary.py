"""Ternary ops: linear layers with packed {-1, 0, +1} weights, and BitNet activation quantization.

The layout work lives in ``interp.kernels.ternary_mlx``. ``prepare_ternary_consts``
runs once when a program is loaded and replaces each packed weight by a
``TernaryWeight`` laid out for this machine (MLX's 2-bit layout, run by paw's Metal
kernel or MLX's exact affine matmul); a handler called with raw arrays (tests, ad-hoc
graphs) prepares on the fly.
"""

from __future__ import annotations

import mlx.core as mx

from interp.kernels.ternary_mlx import TernaryWeight
from interp.kernels.ternary_mlx import act_quant as _act_quant
from interp.ops.registry import implementation


@implementation("ternary_linear")
def ternary_linear(x, packed, scale, bias=None, *, in_features, out_features, packing="2bit"):
    if isinstance(packed, TernaryWeight):
        weight = packed
    else:
        weight = TernaryWeight.prepare(packed, scale, in_features, out_features, packing)
    y = weight(x)
    return y if bias is None else y + bias


@implementation("act_quant")
def act_quant(x, *, bits=8):
    return _act_quant(x, bits)


def prepare_ternary_consts(nodes, consts: dict[str, mx.array]) -> dict[str, object]:
    """Consts with every ternary_linear's packed weight replaced by its prepared layout (load time)."""
    prepared = dict(consts)
    done: dict[str, tuple] = {}
    for node in nodes:
        if node.op != "ternary_linear":
            continue
        packed_name, scale_name = node.inputs[1], node.inputs[2]
        if packed_name not in consts or scale_name not in consts:
            continue  # computed at run time: the handler prepares it per call
        if isinstance(consts[packed_name], TernaryWeight):
            continue  # laid out already: the consts of a loaded model, shared by a sub-graph of it
        key = (scale_name, node.attrs["in_features"], node.attrs["out_features"], node.attrs.get("packing", "2bit"))
        if packed_name in done:
            if done[packed_name] != key:  # the same bytes read two ways: leave them raw
                prepared[packed_name] = consts[packed_name]
            continue
        done[packed_name] = key
        prepared[packed_name] = TernaryWeight.prepare(consts[packed_name], consts[scale_name], key[1], key[2], key[3])
    return prepared
