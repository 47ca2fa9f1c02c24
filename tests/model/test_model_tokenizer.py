from __future__ import annotations

from pathlib import Path

import pytest

from model.errors import TokenizerError
from model.tokenizer import (
    BOS_ID,
    EOS_ID,
    PAD_ID,
    SEP_ID,
    SPECIAL_TOKENS,
    UNK_ID,
    Tokenizer,
    clean_report,
)


@pytest.mark.parametrize(
    ("raw", "clean"),
    [
        ("Heart size is normal.  No effusion.", "heart size is normal . no effusion ."),
        ("1. Lungs clear. 2. No effusion.", "lungs clear . no effusion ."),
        ("Nodule measures 4.5 cm.", "nodule measures 45 cm ."),
        ("Left-sided line; tip at (SVC)!", "left-sided line tip at svc ."),
        ('"Stable" L/R appearance\n__ noted..', "stable lr appearance  noted ."),
        ("A.. b", "a . b ."),
        ("Findings: <none> @ [x] = ?", "findings none  x   ."),
    ],
)
def test_r2gen_cleaning(raw: str, clean: str) -> None:
    assert clean_report(raw) == clean


def test_special_ids_are_distinct() -> None:
    assert len({PAD_ID, BOS_ID, EOS_ID, UNK_ID, SEP_ID}) == 5
    tok = Tokenizer.build([("b a", "c")], min_frequency=1)
    assert tok.id_to_token[: len(SPECIAL_TOKENS)] == SPECIAL_TOKENS
    assert tok.id_to_token[len(SPECIAL_TOKENS) :] == (".", "a", "b", "c")  # alphabetical


def test_min_frequency_and_unk() -> None:
    reports = [("The heart is normal.", "No acute disease.")] * 3 + [("Rare word.", "")]
    tok = Tokenizer.build(reports, min_frequency=2)
    assert "rare" not in tok.token_to_id and "heart" in tok.token_to_id
    ids = tok.encode("Rare heart.", "")
    assert ids[0] == BOS_ID and ids[-1] == EOS_ID and ids[1] == UNK_ID
    assert ids.count(SEP_ID) == 1


def test_encode_decode_readable() -> None:
    findings, impression = "The heart is normal. The lungs are clear.", "No acute disease."
    tok = Tokenizer.build([(findings, impression)], min_frequency=1)
    ids = tok.encode(findings, impression)
    assert tok.decode(ids) == (findings, impression)
    assert tok.decode([*ids, 7, 8]) == (findings, impression)  # stops at EOS


def test_max_tokens_keeps_eos() -> None:
    tok = Tokenizer.build([("a b c d e f", "g h")], min_frequency=1)
    ids = tok.encode("a b c d e f", "g h", max_tokens=5)
    assert len(ids) == 5 and ids[0] == BOS_ID and ids[-1] == EOS_ID


def test_save_load(tmp_path: Path) -> None:
    tok = Tokenizer.build([("The heart is normal.", "No effusion.")], min_frequency=1)
    tok.save(tmp_path / "vocab.json")
    again = Tokenizer.load(tmp_path / "vocab.json")
    assert again.id_to_token == tok.id_to_token


def test_invalid_vocab_rejected(tmp_path: Path) -> None:
    (tmp_path / "v.json").write_text(
        '{"format": "d2r-vocab/1", "special_tokens": [], "tokens": []}'
    )
    with pytest.raises(TokenizerError, match="special_tokens"):
        Tokenizer.load(tmp_path / "v.json")
    with pytest.raises(TokenizerError, match="outside the vocabulary"):
        Tokenizer.build([("a", "b")], min_frequency=1).decode([1, 999])
