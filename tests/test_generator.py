"""Generator: batching, chunked prefill, stopping rules, sampling reproducibility, validation."""

import numpy as np
import pytest

from jaxinfer.generator import Generator, bucket
from jaxinfer.models import init_random
from jaxinfer.sampling_params import SamplingParams
from tests.conftest import tiny_config
from tests.loader import tiny_files


class _Tok:
    """Minimal tokenizer stand-in for the tiny random model."""

    def __init__(self, eos_ids=(2,)):
        self.eos_ids = eos_ids

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(map(str, ids))


def _generator(eos_ids=(2,)):
    cfg = tiny_config(vocab_size=len(tiny_files.vocab_tokens()))
    return Generator(init_random(cfg, seed=11, scale=2.0), _Tok(eos_ids), prefill_chunk=16, decode_chunk=4)


@pytest.fixture(scope="module")
def generator():
    return _generator()


PROMPTS = [[5, 9, 30, 41], list(range(10, 47)), [7]]


def test_batch_equals_each_prompt_alone_with_chunked_prefill(generator):
    params = SamplingParams(max_tokens=9, ignore_eos=True)
    alone = [generator.generate([p], params)[0].output_ids for p in PROMPTS]
    batched = [r.output_ids for r in generator.generate(PROMPTS, params)]
    assert batched == alone
    assert all(len(ids) == 9 for ids in alone)  # 37-token prompt used three 16-token chunks


def test_stops_at_eos_and_reports_finish_reason(generator):
    free = generator.generate([PROMPTS[1]], SamplingParams(max_tokens=30, ignore_eos=True))[0]
    stop_token = free.output_ids[5]
    stopped = _generator((stop_token,)).generate([PROMPTS[1]], SamplingParams(max_tokens=30))[0]
    first = free.output_ids.index(stop_token)
    assert stopped.output_ids == free.output_ids[:first + 1]
    assert stopped.finish_reason == "stop" and free.finish_reason == "length"


def test_sampling_is_reproducible_per_request_and_independent_of_batch(generator):
    params = [SamplingParams(temperature=1.0, top_p=0.95, seed=s, max_tokens=8, ignore_eos=True) for s in (1, 2)]
    both = [r.output_ids for r in generator.generate(PROMPTS[:2], params)]
    assert both[0] == generator.generate([PROMPTS[0]], params[0])[0].output_ids
    assert both[1] == generator.generate([PROMPTS[1]], params[1])[0].output_ids
    other = generator.generate([PROMPTS[0]], SamplingParams(temperature=1.0, seed=3, max_tokens=8, ignore_eos=True))
    assert other[0].output_ids != both[0]


def test_generation_never_passes_the_context(generator):
    context = generator.config.max_position
    prompt = list(np.arange(context - 3) % 200 + 3)
    result = generator.generate([prompt], SamplingParams(max_tokens=50, ignore_eos=True))[0]
    assert len(result.output_ids) == 3 and result.finish_reason == "length"


@pytest.mark.parametrize("prompt, message", [([], "prompt is empty"), ([1] * 256, "context is 256"),
                                             ([1, 999], "outside the vocabulary")])
def test_bad_prompts_are_rejected_before_running(generator, prompt, message):
    with pytest.raises(ValueError, match=message):
        generator.generate([prompt], SamplingParams())


@pytest.mark.parametrize("kwargs", [dict(temperature=-1.0), dict(top_p=0.0), dict(top_p=1.5), dict(top_k=-1),
                                    dict(max_tokens=0), dict(temperature=float("nan")), dict(seed=-1)])
def test_bad_sampling_params_raise(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        SamplingParams(**kwargs)


def test_bucket_sizes():
    assert [bucket(n, 16) for n in (1, 16, 17, 100, 128, 129)] == [16, 16, 32, 128, 128, 256]
