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
    logits, _ = paged.prefill(real_model.model, paged.new_cache(real_model.config, num_pages=32), [(ids, 0, pages)])
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


@pytest.fixture(scope="module")
def default_model():
    """The embedded model as users get it by default: its GGUF's Q4_1 blocks (Q8_0 embedding) run by
    the CPU kernels with int8 activations, llama.cpp's arithmetic."""
    from jaxinfer.layers import quant
    from jaxinfer.loader import load_model

    if not quant.kernels_available():
        pytest.skip("the CPU kernels are unavailable here")
    loaded = load_model("smollm2-135m", "auto")
    assert loaded.model.quant_spec.linear == "q4_1" and loaded.model.quant_spec.embed == "q8_0"
    return loaded


def test_default_quantized_path_agrees_with_reference(default_model, reference_data):
    """Teacher-forced over the reference's own greedy continuations. Rounding activations to int8 per
    32-block moves logits by up to ~0.3 (a flip at a 0.28 top-2 gap was seen), so a near-tie here is a
    gap under 0.5: before the first one the path picks the reference token at every position (greedy
    decoding reproduces the reference up to there), and over all positions it agrees on >= 90% (96.8%
    on 3072 positions of held-out text, profiling/eval_quant_accuracy.py)."""
    agree = total = 0
    for case in CASES:
        data = reference_data["cases"][case]
        ids = data["prompt_ids"] + data["greedy_new_ids"][:-1]
        pages = np.arange(paged.MAX_PAGES_PER_SEQ, dtype=np.int32)
        logits, _ = paged.prefill(default_model.model, paged.new_cache(default_model.config, num_pages=32),
                                  [(ids, 0, pages)])
        predicted = np.asarray(logits)[len(data["prompt_ids"]) - 1:].argmax(-1).tolist()
        gaps = data["greedy_top1_minus_top2_logit_gap"]
        must_match = next((i for i, gap in enumerate(gaps) if gap < 0.5), len(gaps))
        assert predicted[:must_match] == data["greedy_new_ids"][:must_match], case
        agree += sum(p == t for p, t in zip(predicted, data["greedy_new_ids"], strict=True))
        total += len(predicted)
    assert agree / total >= 0.9
