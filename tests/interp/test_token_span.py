"""The fewest tokens a text can take (``interp/token_span.py``): a lower bound that must hold
for every text, or `paw serve` would refuse a prompt that fits."""

from __future__ import annotations

from pathlib import Path

import pytest
from tokenizers import AddedToken, decoders, models, normalizers, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from interp.tokenizer import Tokenizer
from tests.interp.test_half_character import byte_fallback, byte_level

pytestmark = pytest.mark.not_fake_mac_pass


def texts(tokenizer: Tokenizer) -> list[str]:
    """Texts that pack the most bytes into each token: the longest tokens' own text repeated,
    runs of one character, special tokens' text, characters of every UTF-8 length."""
    longest = sorted(range(tokenizer.vocab_size), key=lambda i: -len(tokenizer.decode([i]).encode()))[:20]
    out = [tokenizer.decode([i]) * 40 for i in longest]
    out += [ch * 500 for ch in (" ", "\n", "a", "=", "日", "\U0001F600", "Ａ", "e\u0301")]
    out += ["".join(tokenizer.special_texts) * 20, "<|im_start|>" * 50 + " " * 50]
    return out


def holds_for(tokenizer: Tokenizer) -> None:
    assert tokenizer.max_token_bytes is not None
    for text in texts(tokenizer):
        for special in (False, True):
            assert tokenizer.least_tokens(text) <= len(tokenizer.encode(text, add_special_tokens=special)), text[:40]


def test_the_bound_holds_for_the_tiny_tokenizer(tiny_program):
    tokenizer = Tokenizer(tiny_program)
    holds_for(tokenizer)
    # and is no vacuous one: a long text has a lower bound in the hundreds
    assert tokenizer.least_tokens("hello world " * 1000) >= 12_000 // tokenizer.max_token_bytes > 100


def test_the_bound_holds_for_byte_level_and_byte_fallback(tmp_path):
    holds_for(byte_level(tmp_path / "a", [("Ġ", "æ"), ("a", "a"), ("aa", "aa"), ("aaaa", "aaaa")]))
    holds_for(byte_fallback(tmp_path / "b"))


def test_a_normalizer_that_shrinks_text_is_measured_after_it(tmp_path):
    """NFKC turns a fullwidth "Ａ" (three bytes) into "A" (one): measured before it, 500 of them
    would prove 500 tokens where there are fewer."""
    tok = HFTokenizer(models.BPE(vocab={"A": 0, "AA": 1, "AAAA": 2, "<s>": 3},
                                 merges=[("A", "A"), ("AA", "AA")]))
    tok.normalizer = normalizers.NFKC()
    tok.add_special_tokens(["<s>"])
    (tmp_path / "t").mkdir()
    tok.save(str(tmp_path / "t" / "tokenizer.json"))
    tokenizer = Tokenizer(tmp_path / "t")
    text = "Ａ" * 500
    assert len(tokenizer.encode(text)) == 125
    assert tokenizer.max_token_bytes == 4 and tokenizer.least_tokens(text) == 125


def save(tok: HFTokenizer, directory: Path) -> Tokenizer:
    directory.mkdir()
    tok.save(str(directory / "tokenizer.json"))
    return Tokenizer(directory)


def test_no_bound_where_one_token_can_stand_for_any_length(tmp_path):
    """Tokenizers where a token can cover unbounded text get no bound (so no early refusal)."""
    vocab = {"[UNK]": 0, "a": 1, "<mask>": 2}
    wordpiece = HFTokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]"))  # a whole unknown word: one [UNK]
    fused = HFTokenizer(models.BPE(vocab=vocab, merges=[], unk_token="[UNK]", fuse_unk=True))
    spaces = HFTokenizer(models.BPE(vocab=vocab, merges=[]))
    spaces.pre_tokenizer = pre_tokenizers.Whitespace()  # drops every space
    stripping = HFTokenizer(models.BPE(vocab=vocab, merges=[]))
    stripping.add_special_tokens([AddedToken("<mask>", lstrip=True)])  # swallows the spaces before it
    for name, tok in (("wordpiece", wordpiece), ("fused", fused), ("spaces", spaces), ("stripping", stripping)):
        tok.decoder = decoders.ByteLevel()
        tokenizer = save(tok, tmp_path / name)
        assert tokenizer.max_token_bytes is None and tokenizer.least_tokens("x" * 10_000) == 0, name
    assert len(Tokenizer(tmp_path / "stripping").encode(" " * 1000 + "<mask>", add_special_tokens=False)) == 1
    assert len(Tokenizer(tmp_path / "fused").encode("xyz" * 1000, add_special_tokens=False)) == 1
