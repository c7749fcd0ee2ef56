"""A stream of text that ends inside a character (a reply cut by its token budget) drops that
half character instead of ending in U+FFFD: ``paw run``/``paw chat``'s streaming detokenizer,
the server's ``TextStream`` and ``Tokenizer.decode_finished`` alike, on the three ways a
tokenizer spells bytes (byte-level letters, a byte-level token holding a whole character and
the start of the next, SentencePiece's byte fallback)."""

from __future__ import annotations

import codecs
import json
from pathlib import Path

import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers

from interp.token_bytes import _byte_level_decoder
from interp.tokenizer import Tokenizer
from paw_mlx.engine import TextStream

pytestmark = pytest.mark.not_fake_mac_pass

TEXT = "ok \ufffd 日本 \U0001F600!"


def _save(tok: HFTokenizer, directory: Path) -> Tokenizer:
    directory.mkdir()
    tok.save(str(directory / "tokenizer.json"))
    return Tokenizer(directory)


def byte_level(directory: Path, merges: list[tuple[str, str]]) -> Tokenizer:
    """A byte-level BPE of the 256 byte letters and ``merges``."""
    letters = sorted(_byte_level_decoder(), key=_byte_level_decoder().get)
    vocab = {letter: i for i, letter in enumerate(letters)}
    for left, right in merges:
        vocab[left + right] = len(vocab)
    tok = HFTokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return _save(tok, directory)


def byte_fallback(directory: Path) -> Tokenizer:
    """A SentencePiece-style BPE: ASCII pieces, every other character as <0xAB> byte tokens
    (whose decoder reads a group of byte tokens that is not UTF-8 as one U+FFFD per byte)."""
    vocab = {"<unk>": 0, **{f"<0x{b:02X}>": 1 + b for b in range(256)}}
    for ch in "▁okabcdefghijklmnopqrstuvwxyz!":
        vocab.setdefault(ch, len(vocab))
    tok = HFTokenizer(models.BPE(vocab=vocab, merges=[], byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    return _save(tok, directory)


def whole_prefix(data: bytes) -> str:
    """What a stream cut after ``data`` should show: its text less an unfinished last character."""
    return codecs.getincrementaldecoder("utf-8")("replace").decode(data, final=False)


@pytest.fixture(params=["byte-level", "straddling", "byte-fallback"])
def tokenizer(request, tmp_path) -> Tokenizer:
    if request.param == "byte-level":
        return byte_level(tmp_path / "t", [])
    if request.param == "straddling":  # " \xe6": a space and the first byte of 日 in one token
        return byte_level(tmp_path / "t", [("Ġ", "æ")])
    return byte_fallback(tmp_path / "t")


def streamed(tokenizer: Tokenizer, ids: list[int]) -> tuple[str, str]:
    """The text of ``ids`` through the streaming detokenizer and through ``TextStream``."""
    detokenizer = tokenizer.detokenizer()
    printed = "".join(detokenizer.add_token(token) for token in ids) + detokenizer.finalize()
    stream = TextStream(tokenizer)
    served = "".join(stream.add([token]) for token in ids) + stream.finish()
    return printed, served


def test_a_stream_cut_inside_a_character_ends_before_it(tokenizer):
    ids = tokenizer.encode(TEXT, add_special_tokens=False)
    assert tokenizer.decode(ids) == TEXT
    cut_inside = 0
    for end in range(len(ids) + 1):
        data = b"".join(_bytes(tokenizer, t) for t in ids[:end])
        want = whole_prefix(data)
        cut_inside += want != data.decode("utf-8", errors="replace")
        assert tokenizer.decode_finished(ids[:end]) == want, end
        assert streamed(tokenizer, ids[:end]) == (want, want), end
    assert cut_inside >= 5  # 日, 本 and the emoji were cut inside, the real U+FFFD kept


def test_invalid_bytes_and_u_fffd_at_the_end_stay(tmp_path):
    tokenizer = byte_level(tmp_path / "t", [])
    letters = {byte: letter for letter, byte in _byte_level_decoder().items()}
    for tail in (b"\xff", b"\xe6\x97a", b"\xef\xbf\xbd", b"\xe6\xff"):
        ids = [tokenizer.token_to_id(letters[b]) for b in b"ok " + tail]
        want = (b"ok " + tail).decode("utf-8", errors="replace")
        assert tokenizer.decode_finished(ids) == want
        assert streamed(tokenizer, ids) == (want, want)


def test_special_tokens_left_out_do_not_hide_a_half_character(tiny_program):
    """A skipped special token after half a character: the half character still goes."""
    tokenizer = Tokenizer(tiny_program)
    ids = tokenizer.encode("ok \U0001F600", add_special_tokens=False)
    cut = ids[:-1] + tokenizer.encode("<|im_end|>", add_special_tokens=False)
    assert tokenizer.decode(cut, skip_special_tokens=True).endswith("\ufffd")
    assert tokenizer.decode_finished(cut, skip_special_tokens=True) == "ok "
    detokenizer = tokenizer.detokenizer(skip_special_tokens=True)
    assert "".join(detokenizer.add_token(token) for token in cut) + detokenizer.finalize() == "ok "
    stream = TextStream(tokenizer)
    assert stream.add(cut) + stream.finish() == "ok "


def _bytes(tokenizer: Tokenizer, token: int) -> bytes:
    from interp.token_bytes import TokenText

    return TokenText(tokenizer).bytes(token)


def test_the_tokenizers_used_here_split_characters(tmp_path):
    """The cases above mean something: each tokenizer spells 日 over more than one token."""
    for tokenizer in (byte_level(tmp_path / "a", []), byte_level(tmp_path / "b", [("Ġ", "æ")]),
                      byte_fallback(tmp_path / "c")):
        assert len(tokenizer.encode(" 日", add_special_tokens=False)) >= 2
    straddling = byte_level(tmp_path / "d", [("Ġ", "æ")])
    assert straddling.id_to_token(straddling.encode(" 日", add_special_tokens=False)[0]) == "Ġæ"
    assert json.loads(straddling.to_json())["model"]["type"] == "BPE"
