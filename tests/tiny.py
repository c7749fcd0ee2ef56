"""Builders for tiny random models and tokenizers: everything tests need, no download."""

from __future__ import annotations

from pathlib import Path

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = [
    "The capital of France is Paris.", "Hello, how are you today?", "Parse the options into a JSON list.",
    "(A) cat (B) dog (C) bird", "2024-01-05 is a date.", "positive negative neutral sentiment",
    "def f(x): return x + 1", "Numbers like 3, 14 and 159 appear here.", "user assistant system\n",
]


def make_tokenizer(vocab_size: int = 384):
    """A small byte-level BPE tokenizer with a ChatML template, as a transformers tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS * 4, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   unk_token="<|endoftext|>", pad_token="<|im_end|>", chat_template=CHAT_TEMPLATE)


def tiny_llama_config(**overrides):
    from transformers import LlamaConfig

    params = dict(vocab_size=384, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  bos_token_id=1, eos_token_id=2, pad_token_id=2, tie_word_embeddings=False)
    params.update(overrides)
    return LlamaConfig(**params)


def tiny_model(config, seed: int = 0):
    """A random model from a config, in eval mode, with weights large enough to matter."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    return model


def export_tiny(config, out: Path, tokenizer=None, seed: int = 0, **opts) -> Path:
    from exporter.export import export_model

    model = tiny_model(config, seed)
    return export_model(model, tokenizer, out, source_info={"id": f"tiny-random-{config.model_type}"}, **opts)
