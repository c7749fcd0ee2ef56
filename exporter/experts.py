"""Capture mixture-of-experts layers: routed experts through one op of ours, or densely.

transformers (5.x) routes every expert block decorated with ``use_experts_implementation``
(Mixtral, Qwen2-MoE, OLMoE, Qwen3-MoE, GraniteMoE, ...) through its experts interface.
Its own implementations sort tokens by expert and loop or call grouped matmuls, which
torch.export cannot capture with dynamic shapes. We register ours, "paw", which runs
the block in one of two modes (``experts_mode``, set by the capture):

- "sparse" (the default): each token's hidden state goes through only its top-k
  experts with the custom op ``paw::expert_linear`` (x @ weight[indices].T), lowered to
  the program op ``expert_linear`` and run with MLX's ``gather_mm``: a decode step reads
  k experts' weights, not all of them.
- "dense": every expert runs on every token and the outputs are summed with the
  router's weights (zero for experts a token was not routed to). Plain ops only; costs
  num_experts / top_k times the expert compute. Kept as the reference and the switch
  (``--experts dense``).

A family whose expert block bypasses the interface (DBRX, JetMoE's MLP) gets a recipe
(exporter/recipes.py) whose forward calls ``route`` with its own expert MLP.
Both give transformers' result; the router's top-k stays in the graph as ``topk``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from contextvars import ContextVar

import torch

EXPERTS_IMPLEMENTATION = "paw"
EXPERT_MODES = ("sparse", "dense")


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


#: an expert block's own computation, written once for both modes: mlp(project, x) runs x through
#: the experts with project(x, weight [E, out, in], bias [E, out] or None)
ExpertMLP = Callable[[Callable[..., torch.Tensor], torch.Tensor], torch.Tensor]

_MODE: ContextVar[str] = ContextVar("paw_experts_mode", default="sparse")


@contextlib.contextmanager
def experts_mode(mode: str) -> Iterator[None]:
    """Run expert blocks in ``mode`` ("sparse" or "dense") while the block runs (a capture)."""
    token = _MODE.set(mode)
    try:
        yield
    finally:
        _MODE.reset(token)


def current_mode() -> str:
    """The capture's experts mode, "sparse" or "dense", for a recipe that routes by itself (Llama 4)."""
    return _MODE.get()


def route(hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
          mlp: ExpertMLP) -> torch.Tensor:
    """hidden [T, D] through each token's top-k experts, summed with their weights [T, k]: [T, D].

    In the capture's mode (``experts_mode``): "sparse" runs only the routed experts, with
    ``paw::expert_linear`` (x [T, 1 or k, in] -> [T, k, out]); "dense" runs every expert on
    every token (x [T] or [E, T] + [in] -> [E, T, out]), weighted zero where a token was not routed.
    """
    if _MODE.get() == "dense":
        out = mlp(_project, hidden_states)  # [E, T, D]
        experts = torch.arange(out.shape[0], device=hidden_states.device)
        chosen = (top_k_index.unsqueeze(-1) == experts).to(top_k_weights.dtype)  # [T, k, E]
        weights = (chosen * top_k_weights.unsqueeze(-1)).sum(dim=1)  # [T, E]
        return (out * weights.transpose(0, 1).unsqueeze(-1)).sum(dim=0).to(hidden_states.dtype)

    def project(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return torch.ops.paw.expert_linear(x, weight, top_k_index, bias)

    out = mlp(project, hidden_states.unsqueeze(1))  # [T, k, D]
    return (out * top_k_weights.unsqueeze(-1)).sum(dim=1).to(hidden_states.dtype)


def _project(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [T, in] or [E, T, in] through every expert's weight [E, out, in]: [E, T, out]."""
    out = torch.matmul(x, weight.transpose(1, 2))
    if bias is not None:
        out = out + bias.unsqueeze(1)
    return out


def interface_experts_forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                              top_k_weights: torch.Tensor) -> torch.Tensor:
    """Experts-interface entry: hidden [T, D], top-k ids and weights [T, k] -> [T, D]."""

    def mlp(project, x):
        first = project(x, *_weights(self, "gate_up_proj" if self.has_gate else "up_proj"))
        up = self._apply_gate(first) if self.has_gate else self.act_fn(first)
        out = project(up, *_weights(self, "down_proj"))
        return self.post_expert_norm(out) if getattr(self, "has_post_expert_norm", False) else out

    return route(hidden_states, top_k_index, top_k_weights, mlp)


def use_paw_experts(model: torch.nn.Module) -> bool:
    """Switch the model's experts-interface blocks to our implementation; False if it has none."""
    if not any(hasattr(m, "_apply_gate") and hasattr(m, "down_proj") for m in model.modules()):
        return False
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    ALL_EXPERTS_FUNCTIONS.register(EXPERTS_IMPLEMENTATION, interface_experts_forward)
    model.set_experts_implementation(EXPERTS_IMPLEMENTATION)
    return True
