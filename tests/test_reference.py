"""The embedded SmolLM2-135M against the independent Hugging Face transformers reference (f32)."""

import numpy as np
import pytest

from jaxinfer.engine.kv_cache import KVCache
from jaxinfer.sampling_params import SamplingParams

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
    ids = np.asarray([data["prompt_ids"]], np.int32)
    logits, _ = real_model.model(ids, np.arange(ids.shape[1])[None], KVCache.init(real_model.config, 1, 64))
    last = np.asarray(logits[0, -1], np.float64)
    expected = data["last_prompt_position_top5"]
    assert np.argsort(-last)[:5].tolist() == [t["id"] for t in expected]
    np.testing.assert_allclose(last[[t["id"] for t in expected]], [t["logit"] for t in expected], atol=2e-2)
    logsumexp = np.log(np.exp(last - last.max()).sum()) + last.max()
    assert abs(logsumexp - data["last_prompt_position_logsumexp"]) < 2e-2


@pytest.mark.parametrize("case", CASES)
def test_greedy_continuation_matches_until_first_near_tie(real_generator, reference_data, case):
    data = reference_data["cases"][case]
    result = real_generator.generate([data["prompt_ids"]], SamplingParams(max_tokens=64, ignore_eos=True))[0]
    gaps = data["greedy_top1_minus_top2_logit_gap"]
    must_match = next((i for i, gap in enumerate(gaps) if gap < 0.05), len(gaps))
    assert must_match > 0
    assert result.output_ids[:must_match] == data["greedy_new_ids"][:must_match]
    assert len(result.output_ids) == 64


def test_eos_stops_generation(real_generator, reference_data):
    data = reference_data["cases"]["chat_question"]
    result = real_generator.generate([data["prompt_ids"]], SamplingParams(max_tokens=64))[0]
    eos_at = data["eos_at"]
    assert result.output_ids == data["greedy_new_ids"][:eos_at + 1]
    assert result.finish_reason == "stop"
    assert result.text == real_generator.tokenizer.decode(data["greedy_new_ids"][:eos_at])
