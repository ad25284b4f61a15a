from __future__ import annotations

from pathlib import Path

import pytest

from model.tokenizer import (
    BOS_ID,
    REPLACEMENT_CHAR,
    UNK_ID,
    CharTokenizer,
    SentencePieceTokenizer,
    TokenizerError,
)

TEXTS = [
    "plain ASCII, with punctuation!",
    "  leading and trailing spaces  ",
    "multiple   inner    spaces",
    "\n\nnewlines\n\n\nand more\n",
    "日本語のテキスト",
    "😀👍🏽",
    "café e\u0301",  # precomposed and combining forms stay distinct
    "NUL \x00 inside",
    "",
    "\t",
]
SHAKESPEARE = (Path(__file__).resolve().parent.parent / "data" / "tinyshakespeare.txt").read_text(encoding="utf-8")
CORPUS_SAMPLE = SHAKESPEARE[:30_000] + "".join(TEXTS) * 20


@pytest.fixture(scope="module")
def char_tok() -> CharTokenizer:
    return CharTokenizer.train([CORPUS_SAMPLE])


@pytest.fixture(scope="module")
def sp_tok() -> SentencePieceTokenizer:
    return SentencePieceTokenizer.train([CORPUS_SAMPLE], vocab_size=120)


@pytest.mark.parametrize("text", TEXTS)
def test_char_round_trip(char_tok: CharTokenizer, text: str) -> None:
    enc = char_tok.encode_with_unknowns(text)
    assert enc.unknown_chars == 0
    assert len(enc.ids) == len(text)  # one token per code point
    assert char_tok.decode(enc.ids) == text


@pytest.mark.parametrize("text", [t for t in TEXTS if "\x00" not in t])
def test_sentencepiece_round_trip(sp_tok: SentencePieceTokenizer, text: str) -> None:
    enc = sp_tok.encode_with_unknowns(text)
    assert enc.unknown_chars == 0
    assert sp_tok.decode(enc.ids) == text
    # streaming joins per-token texts: they must concatenate to the same string
    assert "".join(sp_tok.token_text(i) for i in enc.ids) == text


def test_sentencepiece_treats_control_characters_as_unknown(sp_tok: SentencePieceTokenizer) -> None:
    # SentencePiece's trainer drops control characters from its alphabet, so NUL is an unknown
    # character there: counted, decoded as U+FFFD, never a crash.
    enc = sp_tok.encode_with_unknowns("NUL \x00 inside")
    assert enc.unknown_chars == 1
    assert sp_tok.decode(enc.ids) == "NUL \ufffd inside"


@pytest.mark.parametrize("model_type", ["unigram", "bpe"])
def test_sentencepiece_model_types(model_type: str) -> None:
    tok = SentencePieceTokenizer.train([CORPUS_SAMPLE], vocab_size=100, model_type=model_type)
    assert tok.vocab_size == 100
    assert tok.decode(tok.encode("Speak, speak.\n")) == "Speak, speak.\n"


def test_emoji_and_cjk_are_one_char_token_each(char_tok: CharTokenizer) -> None:
    assert len(char_tok.encode("😀")) == 1
    assert len(char_tok.encode("日本")) == 2
    assert len(char_tok.encode("👍🏽")) == 2  # a skin-tone modifier is its own code point


@pytest.mark.parametrize("tok_name", ["char_tok", "sp_tok"])
def test_unknown_characters_are_counted(tok_name: str, request: pytest.FixtureRequest) -> None:
    tok = request.getfixturevalue(tok_name)
    enc = tok.encode_with_unknowns("speak Ωξ speak \ud800")  # Greek unseen; a lone surrogate
    assert enc.unknown_chars == 3
    assert UNK_ID in enc.ids
    decoded = tok.decode(enc.ids)
    assert REPLACEMENT_CHAR in decoded and decoded.startswith("speak ")


def test_specials_are_shared(char_tok: CharTokenizer, sp_tok: SentencePieceTokenizer) -> None:
    for tok in (char_tok, sp_tok):
        assert tok.bos_id == BOS_ID == 0 and tok.unk_id == UNK_ID == 1
        assert tok.decode([BOS_ID]) == ""
        assert tok.decode([UNK_ID]) == REPLACEMENT_CHAR
        assert BOS_ID not in tok.encode(CORPUS_SAMPLE[:200])


def test_out_of_range_ids_are_rejected(char_tok: CharTokenizer) -> None:
    with pytest.raises(ValueError, match="outside the vocabulary"):
        char_tok.decode([char_tok.vocab_size])
    with pytest.raises(ValueError):
        char_tok.decode([-1])


def test_save_and_load(tmp_path: Path, char_tok: CharTokenizer, sp_tok: SentencePieceTokenizer) -> None:
    text = "Speak, speak. 日本語 😀"
    c2 = CharTokenizer.load(char_tok.save(tmp_path))
    s2 = SentencePieceTokenizer.load(sp_tok.save(tmp_path))
    assert c2.encode(text) == char_tok.encode(text)
    assert s2.encode(text) == sp_tok.encode(text)


def test_corrupt_files_fail_clearly(tmp_path: Path) -> None:
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="cannot read character vocabulary"):
        CharTokenizer.load(tmp_path / "tokenizer.json")
    (tmp_path / "tokenizer.model").write_bytes(b"garbage")
    with pytest.raises(TokenizerError, match="not a SentencePiece model"):
        SentencePieceTokenizer.load(tmp_path / "tokenizer.model")
