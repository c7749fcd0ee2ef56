"""A model that uses an op paw cannot lower fails with one line naming the op; nothing is written."""

from __future__ import annotations

import sys

import pytest
import torch

from exporter import aten_ops
from interp.errors import ExportError
from tests.archs import arch_config
from tests.tiny import tiny_model


class _Cumprod(torch.nn.Module):
    """A final-norm stand-in whose forward uses torch.cumprod, which no program op expresses."""

    def __init__(self, norm):
        super().__init__()
        self.norm = norm

    def forward(self, x):
        return self.norm(x) + torch.cumprod(x, dim=-1) * 0


def test_unknown_aten_op_names_the_op_and_writes_nothing(tmp_path):
    from exporter.export import export_model

    model = tiny_model(arch_config("qwen2"))
    model.model.norm = _Cumprod(model.model.norm)
    out = tmp_path / "prog"
    with pytest.raises(ExportError, match=r"aten\.cumprod"):
        export_model(model, None, out)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_cli_export_hf_reports_a_missing_mapping_in_one_line(tmp_path, monkeypatch, capsys, tiny_tokenizer):
    """`paw export hf` on a MoE model whose routing op (topk) has no mapping: one line, exit 1."""
    from apps.cli import main

    folder = tmp_path / "src"
    tiny_model(arch_config("mixtral")).save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    monkeypatch.delitem(aten_ops.ATEN, "aten.topk.default")
    out = tmp_path / "out"
    monkeypatch.setattr(sys, "argv", ["paw", "export", "hf", str(folder), "-o", str(out)])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("paw: error: cannot export: op aten.topk.default")
    assert "Traceback" not in "\n".join(err)
    assert not out.exists()



#: architectures paw refuses, the config overrides that make them tiny, and what the one line names
REFUSED = {
    # recurrent layers no recipe captures (LFM2's conv layers, the Gated DeltaNet, Mamba and RecurrentGemma
    # families' linear_attention layers are captured: exporter/conv.py, exporter/delta_rule.py,
    # exporter/ssm.py, exporter/mamba.py, exporter/rg_lru.py); MiniMax's lightning attention has no op
    "minimax": (dict(head_dim=16, num_local_experts=4, num_experts_per_tok=2),
                r"MiniMaxForCausalLM has recurrent layers \(linear_attention\)"),
    # no layer_types to read: torch.export's failure is put in words
    "rwkv": ({}, r"torch.export could not capture RwkvForCausalLM: its forward fixes the sequence length"),
    # attention written by hand without a recipe: OpenAI GPT masks with its own buffer
    # a mask of its own: Doge adds a learned bias per key (zero at initialisation, so a random
    # tiny Doge used to match while a trained one would not)
    "doge": ({}, r"Doge uses its attention mask as a tensor \(dtype\)"),
    "openai-gpt": (dict(n_embd=64, n_layer=2, n_head=4, n_positions=256),
                   r"OpenAIGPTLMHeadModel computes attention outside transformers' attention interface"),
}


@pytest.mark.parametrize("model_type", sorted(REFUSED))
def test_unsupported_architecture_is_refused_by_name_and_nothing_is_written(tmp_path, monkeypatch, model_type):
    from exporter.export import export_model
    from tests import archs

    overrides, message = REFUSED[model_type]
    monkeypatch.setitem(archs.ARCHS, model_type, overrides)
    out = tmp_path / "prog"
    with pytest.raises(ExportError, match=r"^(cannot export: )?" + message) as refused:
        export_model(tiny_model(arch_config(model_type)), None, out)
    assert "\n" not in str(refused.value)
    assert list(tmp_path.iterdir()) == []


def test_mpt_whose_alibi_slopes_are_not_the_ops_is_refused(tmp_path, monkeypatch):
    """MPT exports with the op's ALiBi (max bias 8) only while transformers' slopes are those; else one line."""
    from transformers.models.mpt import modeling_mpt

    from exporter.export import export_model

    original = modeling_mpt.build_mpt_alibi_tensor

    def steeper(num_heads, sequence_length, alibi_bias_max=8, device=None):
        return original(num_heads, sequence_length, 4, device)

    monkeypatch.setattr(modeling_mpt, "build_mpt_alibi_tensor", steeper)
    out = tmp_path / "prog"
    with pytest.raises(ExportError, match=r"^cannot export: MPT's ALiBi slopes for 6 heads are not the attention op's"):
        export_model(tiny_model(arch_config("mpt")), None, out)
    assert list(tmp_path.iterdir()) == []
