"""Capture mixture-of-experts layers: a dense, exact "paw" experts implementation.

transformers (5.x) routes every expert block decorated with ``use_experts_implementation``
(Mixtral, Qwen2-MoE, ...) through its experts interface. Its default implementations sort
tokens by expert and loop or call grouped matmuls, which torch.export cannot capture with
dynamic shapes. We register "paw": every expert runs on every token and the outputs are
summed with the router's weights (zero for experts a token was not routed to). The
result equals the sparse computation (adding exact zeros), the graph is built from
plain ops (eq, matmul, mul, sum), and the router's top-k stays in the graph as ``topk``.
Dense costs num_experts / top_k times the expert compute; fine for the small MoE models
paw targets, and the place to put a gathered matmul later.
"""

from __future__ import annotations

import torch

EXPERTS_IMPLEMENTATION = "paw"


def _project(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, transposed: bool) -> torch.Tensor:
    """x [T, in] through every expert's weight: [E, T, out]."""
    out = torch.matmul(x, weight if transposed else weight.transpose(1, 2))
    if bias is not None:
        out = out + bias.unsqueeze(1)
    return out


def dense_experts_forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                          top_k_weights: torch.Tensor) -> torch.Tensor:
    """Experts-interface entry: hidden [T, D], top-k ids and weights [T, k] -> [T, D]."""
    experts = torch.arange(self.num_experts, device=hidden_states.device)
    chosen = (top_k_index.unsqueeze(-1) == experts).to(top_k_weights.dtype)  # [T, k, E]
    route = (chosen * top_k_weights.unsqueeze(-1)).sum(dim=1)  # [T, E]
    has_bias = getattr(self, "has_bias", False)
    transposed = getattr(self, "is_transposed", False)
    if self.has_gate:
        up = _project(hidden_states, self.gate_up_proj, self.gate_up_proj_bias if has_bias else None, transposed)
        up = self._apply_gate(up)
    else:
        up = self.act_fn(_project(hidden_states, self.up_proj, self.up_proj_bias if has_bias else None, transposed))
    out = _project(up, self.down_proj, self.down_proj_bias if has_bias else None, transposed)  # [E, T, D]
    if getattr(self, "has_post_expert_norm", False):
        out = self.post_expert_norm(out)
    out = (out * route.transpose(0, 1).unsqueeze(-1)).sum(dim=0)
    return out.to(hidden_states.dtype)


def use_paw_experts(model: torch.nn.Module) -> bool:
    """Switch the model's expert blocks to the dense implementation; False if it has none."""
    if not any(hasattr(m, "_apply_gate") and hasattr(m, "down_proj") for m in model.modules()):
        return False
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    ALL_EXPERTS_FUNCTIONS.register(EXPERTS_IMPLEMENTATION, dense_experts_forward)
    model.set_experts_implementation(EXPERTS_IMPLEMENTATION)
    return True
