"""Report cleaning (R2Gen MIMIC-CXR rules), vocabulary and ids <-> text.

One token sequence carries both report sections::

    <bos> findings tokens <sep> impression tokens <eos>

Special ids are distinct: ``<pad>`` 0, ``<bos>`` 1, ``<eos>`` 2, ``<unk>`` 3,
``<sep>`` 4; words follow alphabetically from 5.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

from model.errors import TokenizerError

PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, UNK_TOKEN, SEP_TOKEN = "<pad>", "<bos>", "<eos>", "<unk>", "<sep>"
SPECIAL_TOKENS: tuple[str, ...] = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, UNK_TOKEN, SEP_TOKEN)
PAD_ID, BOS_ID, EOS_ID, UNK_ID, SEP_ID = range(len(SPECIAL_TOKENS))

VOCAB_FORMAT = "d2r-vocab/1"

# ':-\[' inside the class is a range (0x3A-0x5B): ': ; < = > ? @ [' are removed, '-' is kept.
_SENTENCE_PUNCT = re.compile(r"[.,?;*!%^&_+():-\[\]{}]")
_NUMBERED = (
    ("1. ", ""),
    (". 2. ", ". "),
    (". 3. ", ". "),
    (". 4. ", ". "),
    (". 5. ", ". "),
    (" 2. ", ". "),
    (" 3. ", ". "),
    (" 4. ", ". "),
    (" 5. ", ". "),
)


def _clean_sentence(sentence: str) -> str:
    for ch in ('"', "/", "\\", "'"):
        sentence = sentence.replace(ch, "")
    return _SENTENCE_PUNCT.sub("", sentence.strip().lower())


def clean_report(text: str) -> str:
    """Normalise a report section with R2Gen's MIMIC-CXR cleaning.

    Sentences end with a ``.`` token; decimal points vanish (``4.5`` -> ``45``).

    >>> clean_report("Heart size is normal.  No effusion or pneumothorax.")
    'heart size is normal . no effusion or pneumothorax .'
    """
    text = text.replace("\n", " ")
    text = re.sub(r"_{2,}", "_", text)
    text = re.sub(r" {2,}", " ", text)
    text = re.sub(r"\.{2,}", ".", text)
    for old, new in _NUMBERED:
        text = text.replace(old, new)
    sentences = [_clean_sentence(s) for s in text.strip().lower().split(". ")]
    return " . ".join(sentences) + " ."


def tokenize(text: str) -> list[str]:
    """Clean ``text`` and split it into word tokens (``.`` included)."""
    if not text.strip():
        return []
    return clean_report(text).split()


def _sentences_to_text(tokens: Sequence[str]) -> str:
    sentences: list[str] = []
    current: list[str] = []
    for tok in [*tokens, "."]:
        if tok == ".":
            if current:
                sentence = " ".join(current)
                sentences.append(sentence[0].upper() + sentence[1:])
            current = []
        else:
            current.append(tok)
    return " ".join(s + "." for s in sentences)


class Tokenizer:
    """Vocabulary with distinct special ids and a section separator.

    Parameters
    ----------
    words : sequence of str
        Ordinary vocabulary words (no special tokens), in id order.
    """

    def __init__(self, words: Sequence[str]) -> None:
        words = list(words)
        dupes = [w for w, n in Counter(words).items() if n > 1]
        if dupes:
            raise TokenizerError(f"words: duplicate tokens {dupes[:3]}")
        clash = sorted(set(words) & set(SPECIAL_TOKENS))
        if clash:
            raise TokenizerError(f"words: special tokens {clash} must not be listed as words")
        if any(not isinstance(w, str) or not w or w != w.strip() for w in words):
            raise TokenizerError("words: every word must be a non-empty string without spaces")
        self.id_to_token: tuple[str, ...] = (*SPECIAL_TOKENS, *words)
        self.token_to_id: dict[str, int] = {t: i for i, t in enumerate(self.id_to_token)}

    pad_id, bos_id, eos_id, unk_id, sep_id = PAD_ID, BOS_ID, EOS_ID, UNK_ID, SEP_ID

    def __len__(self) -> int:
        return len(self.id_to_token)

    @property
    def vocab_size(self) -> int:
        """Number of ids, special tokens included."""
        return len(self.id_to_token)

    @classmethod
    def build(cls, reports: Iterable[tuple[str, str]], *, min_frequency: int = 10) -> Tokenizer:
        """Build the vocabulary from ``(findings, impression)`` training reports.

        Words seen fewer than ``min_frequency`` times map to ``<unk>``.
        """
        if min_frequency < 1:
            raise TokenizerError(f"min_frequency: must be >= 1, got {min_frequency}")
        counts: Counter[str] = Counter()
        for findings, impression in reports:
            counts.update(tokenize(findings))
            counts.update(tokenize(impression))
        words = sorted(
            w for w, n in counts.items() if n >= min_frequency and w not in SPECIAL_TOKENS
        )
        return cls(words)

    def encode(self, findings: str, impression: str, *, max_tokens: int | None = None) -> list[int]:
        """Ids ``<bos> findings <sep> impression <eos>``, cut to ``max_tokens`` (EOS kept)."""
        body = [self.token_to_id.get(t, UNK_ID) for t in tokenize(findings)]
        body.append(SEP_ID)
        body.extend(self.token_to_id.get(t, UNK_ID) for t in tokenize(impression))
        if max_tokens is not None:
            if max_tokens < 3:
                raise TokenizerError(f"max_tokens: must be >= 3, got {max_tokens}")
            body = body[: max_tokens - 2]
        return [BOS_ID, *body, EOS_ID]

    def decode_tokens(self, ids: Sequence[int]) -> list[str]:
        """Tokens of ``ids`` up to the first EOS, without PAD/BOS/EOS."""
        out: list[str] = []
        for i in ids:
            i = int(i)
            if not 0 <= i < len(self.id_to_token):
                raise TokenizerError(f"ids: token id {i} outside the vocabulary of {len(self)}")
            if i == EOS_ID:
                break
            if i in (PAD_ID, BOS_ID):
                continue
            out.append(self.id_to_token[i])
        return out

    def decode(self, ids: Sequence[int]) -> tuple[str, str]:
        """Readable ``(findings, impression)``: capitalised sentences joined by ``". "``."""
        tokens = self.decode_tokens(ids)
        if SEP_TOKEN in tokens:
            cut = tokens.index(SEP_TOKEN)
            findings, impression = tokens[:cut], [t for t in tokens[cut + 1 :] if t != SEP_TOKEN]
        else:
            findings, impression = tokens, []
        return _sentences_to_text(findings), _sentences_to_text(impression)

    def to_dict(self) -> dict[str, object]:
        """JSON mapping: format, special tokens and the full id -> token list."""
        return {
            "format": VOCAB_FORMAT,
            "special_tokens": list(SPECIAL_TOKENS),
            "tokens": list(self.id_to_token),
        }

    @classmethod
    def from_dict(cls, data: object) -> Tokenizer:
        """Inverse of :meth:`to_dict`; errors name the bad field."""
        if not isinstance(data, dict):
            raise TokenizerError("vocab: expected a JSON object")
        if data.get("format") != VOCAB_FORMAT:
            raise TokenizerError(f"format: expected {VOCAB_FORMAT!r}, got {data.get('format')!r}")
        if data.get("special_tokens") != list(SPECIAL_TOKENS):
            raise TokenizerError(f"special_tokens: expected {list(SPECIAL_TOKENS)}")
        tokens = data.get("tokens")
        if not isinstance(tokens, list) or tokens[: len(SPECIAL_TOKENS)] != list(SPECIAL_TOKENS):
            raise TokenizerError("tokens: expected a list starting with the special tokens")
        return cls(tokens[len(SPECIAL_TOKENS) :])

    def save(self, path: Path) -> None:
        """Write the vocabulary as JSON."""
        path.write_text(json.dumps(self.to_dict(), indent=1) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path: Path) -> Tokenizer:
        """Read a vocabulary written by :meth:`save`."""
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise TokenizerError(f"{path.name}: cannot read vocabulary: {e}") from e
        return cls.from_dict(data)


__all__ = [
    "BOS_ID",
    "EOS_ID",
    "PAD_ID",
    "SEP_ID",
    "SPECIAL_TOKENS",
    "UNK_ID",
    "Tokenizer",
    "clean_report",
    "tokenize",
]
