"""Tokenizers: one protocol, two implementations (Unicode characters, SentencePiece subwords).

Both reserve the same two special ids so the rest of the code never asks which kind it has:

    0  <s>    start of text: every sequence begins by feeding it, so a fresh state is well
              defined and the first character of a text is predicted like every other
    1  <unk>  any character the vocabulary does not hold

Decoding renders <s> as "" and <unk> as U+FFFD. Generation never emits either.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

BOS_ID = 0
UNK_ID = 1
BOS_TEXT = "<s>"
UNK_TEXT = "<unk>"
REPLACEMENT_CHAR = "\ufffd"

CHAR_VOCAB_FILE = "tokenizer.json"
SP_MODEL_FILE = "tokenizer.model"

# SentencePiece writes a space as U+2581; a literal U+2581 in the input would decode as a space,
# so it is treated as unknown, like lone surrogates (which are not valid UTF-8 at all).
_SP_UNENCODABLE = re.compile("[\u2581\ud800-\udfff]")


class TokenizerError(ValueError):
    """A tokenizer file is missing, corrupt, or does not match what the checkpoint says."""


@dataclass(frozen=True)
class Encoding:
    """Token ids of a text plus how many of its characters the vocabulary did not know."""

    ids: list[int]
    unknown_chars: int


@runtime_checkable
class Tokenizer(Protocol):
    kind: str
    vocab_size: int
    bos_id: int
    unk_id: int

    def encode(self, text: str) -> list[int]: ...

    def encode_with_unknowns(self, text: str) -> Encoding: ...

    def decode(self, ids: Iterable[int]) -> str: ...

    def token_text(self, token_id: int) -> str: ...

    @property
    def texts(self) -> Sequence[str]: ...

    def save(self, directory: Path) -> Path: ...


def _check_ids(ids: Iterable[int], vocab_size: int) -> list[int]:
    out = [int(i) for i in ids]
    for i in out:
        if not 0 <= i < vocab_size:
            raise ValueError(f"token id {i} is outside the vocabulary (0..{vocab_size - 1})")
    return out


class _TokenTable:
    """Decoding shared by both tokenizers: every id maps to a fixed text, so decoding is a join
    (and streaming a token's text is exact: the pieces concatenate to the decoded string)."""

    _texts: list[str]
    vocab_size: int

    def decode(self, ids: Iterable[int]) -> str:
        texts = self._texts
        return "".join(texts[i] for i in _check_ids(ids, self.vocab_size))

    def token_text(self, token_id: int) -> str:
        return self._texts[_check_ids([token_id], self.vocab_size)[0]]

    @property
    def texts(self) -> Sequence[str]:
        """Every id's text, indexed by id (decoding without a per-token check)."""
        return self._texts


class CharTokenizer(_TokenTable):
    """One token per Unicode code point (an emoji or a CJK character is one token)."""

    kind = "char"
    bos_id = BOS_ID
    unk_id = UNK_ID

    def __init__(self, chars: Iterable[str]):
        self.chars: list[str] = list(chars)
        if any(len(c) != 1 for c in self.chars) or len(set(self.chars)) != len(self.chars):
            raise TokenizerError("character vocabulary must hold distinct single code points")
        self._texts = ["", REPLACEMENT_CHAR, *self.chars]
        self._index = {c: i + 2 for i, c in enumerate(self.chars)}
        self.vocab_size = len(self._texts)

    @classmethod
    def train(cls, texts: Iterable[str]) -> CharTokenizer:
        """Vocabulary = every distinct code point of the corpus, in code point order."""
        seen: set[str] = set()
        for text in texts:
            seen.update(text)
        return cls(sorted(seen))

    def encode(self, text: str) -> list[int]:
        return self.encode_with_unknowns(text).ids

    def encode_with_unknowns(self, text: str) -> Encoding:
        get = self._index.get
        ids = [get(c, UNK_ID) for c in text]
        return Encoding(ids, ids.count(UNK_ID))

    def save(self, directory: Path) -> Path:
        path = Path(directory) / CHAR_VOCAB_FILE
        doc = {"kind": "char", "specials": [BOS_TEXT, UNK_TEXT], "chars": self.chars}
        path.write_text(json.dumps(doc, ensure_ascii=True, indent=0) + "\n", encoding="utf-8")
        return path

    @classmethod
    def load(cls, path: Path) -> CharTokenizer:
        try:
            doc = json.loads(Path(path).read_text(encoding="utf-8"))
            if doc.get("kind") != "char" or doc.get("specials") != [BOS_TEXT, UNK_TEXT]:
                raise TokenizerError(f"{path} is not a character vocabulary of this format")
            return cls(doc["chars"])
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
            raise TokenizerError(f"cannot read character vocabulary {path}: {exc}") from exc


class SentencePieceTokenizer(_TokenTable):
    """SentencePiece subwords, trained so that decoding gives back the exact text.

    Identity normalisation, no dummy prefix and whitespace kept as-is make
    decode(encode(text)) == text for any text whose characters are all in the vocabulary.
    """

    kind = "sentencepiece"
    bos_id = BOS_ID
    unk_id = UNK_ID

    def __init__(self, model_proto: bytes):
        import sentencepiece as spm

        self.model_proto = model_proto
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.LoadFromSerializedProto(model_proto)
        except (RuntimeError, OSError) as exc:
            raise TokenizerError(f"not a SentencePiece model: {exc}") from exc
        if self._sp.bos_id() != BOS_ID or self._sp.unk_id() != UNK_ID:
            raise TokenizerError("SentencePiece model must use bos_id=0 and unk_id=1")
        self.vocab_size = int(self._sp.get_piece_size())
        pieces = [self._sp.id_to_piece(i).replace("\u2581", " ") for i in range(self.vocab_size)]
        self._texts = ["", REPLACEMENT_CHAR, *pieces[2:]]
        self._known = frozenset("".join(pieces[2:]))

    @classmethod
    def train(
        cls,
        texts: Iterable[str],
        vocab_size: int = 1024,
        model_type: str = "unigram",
        num_threads: int = 2,
    ) -> SentencePieceTokenizer:
        """Train on lines of the corpus (newlines included, so they become tokens)."""
        import io

        import sentencepiece as spm

        if model_type not in ("unigram", "bpe"):
            raise ValueError("model_type must be 'unigram' or 'bpe'")
        lines = (line for text in texts for line in text.splitlines(keepends=True))
        buffer = io.BytesIO()
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=(_SP_UNENCODABLE.sub(REPLACEMENT_CHAR, s) for s in lines),
                model_writer=buffer,
                vocab_size=vocab_size,
                model_type=model_type,
                normalization_rule_name="identity",
                add_dummy_prefix=False,
                remove_extra_whitespaces=False,
                allow_whitespace_only_pieces=True,
                split_by_whitespace=True,
                character_coverage=1.0,
                bos_id=BOS_ID,
                unk_id=UNK_ID,
                eos_id=-1,
                pad_id=-1,
                user_defined_symbols=["\n"],
                max_sentence_length=1 << 20,
                num_threads=num_threads,
                minloglevel=2,
            )
        except RuntimeError as exc:  # e.g. "Vocabulary size too high (N). Please set it to a value <= M."
            raise TokenizerError(f"SentencePiece training failed: {exc}; lower --sp-vocab-size or add text") from exc
        return cls(buffer.getvalue())

    def _clean(self, text: str) -> str:
        return _SP_UNENCODABLE.sub(REPLACEMENT_CHAR, text)

    def encode(self, text: str) -> list[int]:
        return list(self._sp.encode(self._clean(text)))

    def encode_with_unknowns(self, text: str) -> Encoding:
        text = self._clean(text)
        known = self._known
        unknown = sum(1 for c in text if c not in known)
        return Encoding(list(self._sp.encode(text)), unknown)

    def save(self, directory: Path) -> Path:
        path = Path(directory) / SP_MODEL_FILE
        path.write_bytes(self.model_proto)
        return path

    @classmethod
    def load(cls, path: Path) -> SentencePieceTokenizer:
        try:
            return cls(Path(path).read_bytes())
        except OSError as exc:
            raise TokenizerError(f"cannot read SentencePiece model {path}: {exc}") from exc


TOKENIZER_FILES = {CharTokenizer.kind: CHAR_VOCAB_FILE, SentencePieceTokenizer.kind: SP_MODEL_FILE}


def load_tokenizer(kind: str, directory: Path) -> Tokenizer:
    """Load the tokenizer a checkpoint directory holds, by the kind its config names."""
    if kind == CharTokenizer.kind:
        return CharTokenizer.load(Path(directory) / CHAR_VOCAB_FILE)
    if kind == SentencePieceTokenizer.kind:
        return SentencePieceTokenizer.load(Path(directory) / SP_MODEL_FILE)
    raise TokenizerError(f"unknown tokenizer kind {kind!r} (expected 'char' or 'sentencepiece')")
