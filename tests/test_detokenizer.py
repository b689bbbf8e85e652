"""Incremental detokenization on the real tokenizer: deltas add up, never a broken character."""

import pytest

from jaxinfer.detokenizer import IncrementalDetokenizer

pytestmark = pytest.mark.real_model

TEXTS = ["Hello, world! Ünïcödé façade — naïve café.",
         "日本語のテキストと中文字符 mixed with English.",
         "Emoji: 🦙🚀👩‍💻 and flags 🇫🇷🇯🇵 end.",
         "  leading spaces\n\ttabs and\r\nnewlines  "]


@pytest.mark.parametrize("text", TEXTS)
def test_streamed_deltas_equal_full_decode(real_model, text):
    tokenizer = real_model.tokenizer
    ids = tokenizer.encode(text)
    detok = IncrementalDetokenizer(tokenizer)
    deltas = [detok.push(t) for t in ids]
    deltas.append(detok.flush())
    assert "".join(deltas) == tokenizer.decode(ids) == text
    assert not any("\ufffd" in d for d in deltas)


def test_multibyte_characters_are_held_until_complete(real_model):
    tokenizer = real_model.tokenizer
    ids = tokenizer.encode("🦙")
    assert len(ids) > 1  # the emoji's bytes span several byte-level tokens
    detok = IncrementalDetokenizer(tokenizer)
    assert [detok.push(t) for t in ids[:-1]] == [""] * (len(ids) - 1)
    assert detok.push(ids[-1]) == "🦙"


def test_special_tokens_are_skipped_by_default(real_model):
    tokenizer = real_model.tokenizer
    detok = IncrementalDetokenizer(tokenizer)
    ids = tokenizer.encode("Paris.<|im_end|>")
    assert "".join(detok.push(t) for t in ids) + detok.flush() == "Paris."
