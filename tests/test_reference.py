"""The embedded SmolLM2-135M against the independent Hugging Face transformers reference (f32)."""

import numpy as np
import pytest

from jaxinfer.sampling_params import SamplingParams
from tests.models import paged

pytestmark = pytest.mark.real_model
CASES = ["chat_question", "code_snippet", "english_paragraph"]


@pytest.mark.parametrize("case", CASES)
def test_tokenizer_ids_match_reference(real_model, reference_data, case):
    data = reference_data["cases"][case]
    assert real_model.tokenizer.encode(data["prompt"]) == data["prompt_ids"]


def test_chat_template_renders_reference_prompt(real_model, reference_data):
    question = "What is the capital of France, and why is it famous?"
    rendered = real_model.tokenizer.apply_chat_template([{"role": "user", "content": question}])
    assert rendered == reference_data["cases"]["chat_question"]["prompt"]


@pytest.mark.parametrize("case", CASES)
def test_last_position_top5_and_logits(real_model, reference_data, case):
    data = reference_data["cases"][case]
    ids = data["prompt_ids"]
    pages = np.arange(paged.MAX_PAGES_PER_SEQ, dtype=np.int32)
    logits, _ = paged.prefill(real_model.model, paged.new_cache(real_model.config, num_pages=16), [(ids, 0, pages)])
    last = np.asarray(logits[-1], np.float64)
    expected = data["last_prompt_position_top5"]
    assert np.argsort(-last)[:5].tolist() == [t["id"] for t in expected]
    np.testing.assert_allclose(last[[t["id"] for t in expected]], [t["logit"] for t in expected], atol=2e-2)
    logsumexp = np.log(np.exp(last - last.max()).sum()) + last.max()
    assert abs(logsumexp - data["last_prompt_position_logsumexp"]) < 2e-2


@pytest.mark.parametrize("case", CASES)
def test_greedy_continuation_matches_until_first_near_tie(real_engine, reference_data, case):
    data = reference_data["cases"][case]
    result = real_engine.generate([data["prompt_ids"]], SamplingParams(max_tokens=64, ignore_eos=True))[0]
    gaps = data["greedy_top1_minus_top2_logit_gap"]
    must_match = next((i for i, gap in enumerate(gaps) if gap < 0.05), len(gaps))
    assert must_match > 0
    assert result.output_ids[:must_match] == data["greedy_new_ids"][:must_match]
    assert len(result.output_ids) == 64


def test_batched_greedy_equals_reference(real_engine, reference_data):
    """All three prompts in one engine batch (mixed lengths, prefill chunks beside decodes)."""
    cases = [reference_data["cases"][case] for case in CASES]
    results = real_engine.generate([c["prompt_ids"] for c in cases], SamplingParams(max_tokens=64, ignore_eos=True))
    for data, result in zip(cases, results, strict=False):
        gaps = data["greedy_top1_minus_top2_logit_gap"]
        must_match = next((i for i, gap in enumerate(gaps) if gap < 0.05), len(gaps))
        assert result.output_ids[:must_match] == data["greedy_new_ids"][:must_match]


def test_eos_stops_generation(real_engine, reference_data):
    data = reference_data["cases"]["chat_question"]
    result = real_engine.generate([data["prompt_ids"]], SamplingParams(max_tokens=64))[0]
    eos_at = data["eos_at"]
    assert result.output_ids == data["greedy_new_ids"][:eos_at + 1]
    assert result.finish_reason == "stop"
    assert result.text == real_engine.tokenizer.decode(data["greedy_new_ids"][:eos_at])
