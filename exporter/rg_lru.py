"""RecurrentGemma's recurrent blocks captured as a short convolution and one ``lru_scan`` op.

A Griffin recurrent block (RecurrentGemma) projects its input into a gated branch and an x
branch, runs a depthwise causal ``Conv1d`` over x, then the RG-LRU: input and recurrence
gates from block-diagonal projections, a decay a = exp(-8 * r * softplus(Λ)) per channel and
position, and the diagonal linear recurrence h = a * h + sqrt(1 - a²) * (i * x), which
transformers keeps (with the convolution's last inputs) on the modules themselves. A program
keeps no state in the graph, so the recipe (``exporter/recipes.py``) replaces the block's
forward (the convolution as ``paw::causal_conv1d``, ``exporter/conv.py``) and the RG-LRU's
``_rnn_scan`` (the recurrence as ``paw::lru_scan``, below); the gates, the decay, the
normalisation and the reset at position 0 stay the RG-LRU's own ordinary ops, computed by
its own forward.

The recurrence is not ``ssm_scan``'s: that op scales its input by the same dt that sets the
decay, so it could carry RG-LRU's input only divided by the gate, which is not exact. The
op's reference here is the recurrence from a zero state, which is what capture runs.
"""

from __future__ import annotations

import torch

from exporter import conv  # noqa: F401  (registers paw::causal_conv1d)


@torch.library.custom_op("paw::lru_scan", mutates_args=())
def paw_lru_scan(a: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Reference semantics of the program's ``lru_scan`` op, from a zero state, in float32.

    a, x [batch, L, D]; h_t = a_t * h_{t-1} + x_t per channel; returns float32 [batch, L, D].
    """
    a, x = a.float(), x.float()
    state = x.new_zeros(x.shape[0], x.shape[2])
    outputs = []
    for t in range(x.shape[1]):
        state = a[:, t] * state + x[:, t]
        outputs.append(state)
    return torch.stack(outputs, dim=1)


@paw_lru_scan.register_fake
def _paw_lru_scan_fake(a, x):
    return torch.empty(x.shape, dtype=torch.float32, device=x.device)


def rnn_scan(self, hidden_states, recurrent_gate, reset, recurrent_states=None, acc_dtype=torch.float32):
    """``RecurrentGemmaRglru._rnn_scan`` through ``paw::lru_scan``: (h in the input's dtype, no state).

    As transformers computes it: the decay is zero where a sequence starts (``reset``), the
    recurrence runs in float32. Capture runs from no state, so any state the module kept from an
    eager run of its own is not read (the interpreter owns the state: ``interp/lru_state.py``).
    """
    states = torch.ops.paw.lru_scan(recurrent_gate * ~reset, hidden_states)
    return states.to(hidden_states.dtype), None


def recurrent_block_forward(self, input_states, position_ids, attention_mask=None, use_cache=True, **kwargs):
    """``RecurrentGemmaRecurrentBlock`` without its conv state, the convolution as ``paw::causal_conv1d``.

    transformers' forward convolves channels first with K - 1 zeros on both sides and keeps the
    first L outputs: the causal convolution over the new positions. The mask is unused: a
    program's rows are never padded through a recurrent state (``interp/recurrent.py``).
    """
    y_branch = self.act_fn(self.linear_y(input_states))
    x_branch = torch.ops.paw.causal_conv1d(self.linear_x(input_states), self.conv_1d.weight, self.conv_1d.bias)
    x_branch = self.rg_lru(x_branch, position_ids)
    return self.linear_out(x_branch * y_branch), None


#: the RecurrentGemma methods the recipe replaces
FORWARDS = {"RecurrentGemmaRecurrentBlock": recurrent_block_forward, "RecurrentGemmaRglru._rnn_scan": rnn_scan}
