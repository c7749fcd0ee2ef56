"""Capture mixture-of-experts layers: routed experts through one op of ours, or densely.

transformers (5.x) routes every expert block decorated with ``use_experts_implementation``
(Mixtral, Qwen2-MoE, OLMoE, Qwen3-MoE, GraniteMoE, ...) through its experts interface.
Its own implementations sort tokens by expert and loop or call grouped matmuls, which
torch.export cannot capture with dynamic shapes. We register two of ours:

- "paw" (sparse, the default): each token's hidden state goes through only its top-k
  experts with the custom op ``paw::expert_linear`` (x @ weight[indices].T), lowered to
  the program op ``expert_linear`` and run with MLX's ``gather_mm``: a decode step reads
  k experts' weights, not all of them.
- "paw-dense": every expert runs on every token and the outputs are summed with the
  router's weights (zero for experts a token was not routed to). Plain ops only; costs
  num_experts / top_k times the expert compute. Kept as the reference and the switch
  (``--experts dense``).

Both give transformers' result; the router's top-k stays in the graph as ``topk``.
"""

from __future__ import annotations

import torch

EXPERTS_IMPLEMENTATION = "paw"
DENSE_EXPERTS_IMPLEMENTATION = "paw-dense"
EXPERT_MODES = {"sparse": EXPERTS_IMPLEMENTATION, "dense": DENSE_EXPERTS_IMPLEMENTATION}


@torch.library.custom_op("paw::expert_linear", mutates_args=())
def paw_expert_linear(x: torch.Tensor, weight: torch.Tensor, indices: torch.Tensor,
                      bias: torch.Tensor | None = None) -> torch.Tensor:
    """Reference semantics of the program's ``expert_linear`` op.

    weight [E, out, in]; indices [..., k]; x [..., in] whose leading axes broadcast
    against ``indices``' shape; returns broadcast(x.shape[:-1], indices.shape) + [out].
    """
    chosen = weight[indices]  # [..., k, out, in]
    out = (x.unsqueeze(-2) @ chosen.transpose(-1, -2)).squeeze(-2)
    if bias is not None:
        out = out + bias[indices]
    return out.contiguous()


@paw_expert_linear.register_fake
def _paw_expert_linear_fake(x, weight, indices, bias=None):
    batch = torch.broadcast_shapes(x.shape[:-1], indices.shape)
    return x.new_empty((*batch, weight.shape[1]))


def _weights(self, name: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """An expert projection's stacked weight as [E, out, in], and its bias if the block has one."""
    weight = getattr(self, name)
    if getattr(self, "is_transposed", False):
        weight = weight.transpose(1, 2)
    bias = getattr(self, f"{name}_bias", None) if getattr(self, "has_bias", False) else None
    return weight, bias


def sparse_experts_forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                           top_k_weights: torch.Tensor) -> torch.Tensor:
    """Experts-interface entry: hidden [T, D], top-k ids and weights [T, k] -> [T, D]."""
    first, first_bias = _weights(self, "gate_up_proj" if self.has_gate else "up_proj")
    up = torch.ops.paw.expert_linear(hidden_states.unsqueeze(1), first, top_k_index, first_bias)  # [T, k, 2I]
    up = self._apply_gate(up) if self.has_gate else self.act_fn(up)
    down, down_bias = _weights(self, "down_proj")
    out = torch.ops.paw.expert_linear(up, down, top_k_index, down_bias)  # [T, k, D]
    if getattr(self, "has_post_expert_norm", False):
        out = self.post_expert_norm(out)
    out = (out * top_k_weights.unsqueeze(-1)).sum(dim=1)
    return out.to(hidden_states.dtype)


def _project(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x [T, in] through every expert's weight [E, out, in]: [E, T, out]."""
    out = torch.matmul(x, weight.transpose(1, 2))
    if bias is not None:
        out = out + bias.unsqueeze(1)
    return out


def dense_experts_forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                          top_k_weights: torch.Tensor) -> torch.Tensor:
    """Experts-interface entry: hidden [T, D], top-k ids and weights [T, k] -> [T, D]."""
    experts = torch.arange(self.num_experts, device=hidden_states.device)
    chosen = (top_k_index.unsqueeze(-1) == experts).to(top_k_weights.dtype)  # [T, k, E]
    route = (chosen * top_k_weights.unsqueeze(-1)).sum(dim=1)  # [T, E]
    if self.has_gate:
        up = self._apply_gate(_project(hidden_states, *_weights(self, "gate_up_proj")))
    else:
        up = self.act_fn(_project(hidden_states, *_weights(self, "up_proj")))
    out = _project(up, *_weights(self, "down_proj"))  # [E, T, D]
    if getattr(self, "has_post_expert_norm", False):
        out = self.post_expert_norm(out)
    out = (out * route.transpose(0, 1).unsqueeze(-1)).sum(dim=0)
    return out.to(hidden_states.dtype)


def use_paw_experts(model: torch.nn.Module, mode: str = "sparse") -> bool:
    """Switch the model's expert blocks to our implementation (``EXPERT_MODES``); False if it has none."""
    if not any(hasattr(m, "_apply_gate") and hasattr(m, "down_proj") for m in model.modules()):
        return False
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    ALL_EXPERTS_FUNCTIONS.register(EXPERTS_IMPLEMENTATION, sparse_experts_forward)
    ALL_EXPERTS_FUNCTIONS.register(DENSE_EXPERTS_IMPLEMENTATION, dense_experts_forward)
    model.set_experts_implementation(EXPERT_MODES[mode])
    return True
