"""The offline API as a user calls it: LLM(model).generate(prompts, params) on a GGUF file."""

import pytest

from jaxinfer import LLM, CacheConfig, EngineConfig, SamplingParams, SchedulerConfig
from tests.conftest import tiny_config
from tests.loader import tiny_files
from tests.models import numpy_llama


@pytest.fixture(scope="module")
def llm(tmp_path_factory, monkeypatch_module):
    path = tmp_path_factory.mktemp("llm") / "tiny.gguf"
    cfg = tiny_config(vocab_size=len(tiny_files.vocab_tokens()), max_position=64)
    tiny_files.write_gguf(path, cfg, numpy_llama.random_tensors(cfg, seed=12), "Q8_0")
    config = EngineConfig(cache=CacheConfig(page_size=4, num_pages=64),
                          scheduler=SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=32, max_prefill_seqs=2,
                                                    decode_buckets=(4,), prefill_buckets=(32,), kv_buckets=(64,)))
    return LLM(str(path), config=config)


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        # the session's compilation cache is on (tests/conftest.py): LLM leaves jax's configuration alone
        patch.setenv("JAXINFER_COMPILATION_CACHE", "0")
        yield patch


def test_generate_text_ids_and_lists(llm):
    params = SamplingParams(max_tokens=5, ignore_eos=True)
    one = llm.generate("hello", params)
    assert len(one) == 1 and len(one[0].output_ids) == 5 and one[0].finished
    ids = llm.tokenizer.encode("hello")
    assert llm.generate(ids, params)[0].output_ids == one[0].output_ids
    many = llm.generate(["hello", "a b c", "xyz"], params)
    assert many[0].output_ids == one[0].output_ids
    assert [o.prompt_ids for o in many] == [llm.tokenizer.encode(t) for t in ["hello", "a b c", "xyz"]]
    assert many[1].text == llm.tokenizer.decode(many[1].output_ids)


def test_per_request_timings_and_no_compile_after_warm_up(llm):
    compiles = llm.engine.runner.num_compiles
    out = llm.generate(["one", "two two"], [SamplingParams(max_tokens=3, ignore_eos=True),
                                             SamplingParams(max_tokens=4, temperature=0.7, seed=3, ignore_eos=True)])
    for output in out:
        m = output.metrics
        assert 0 <= m.queue_seconds <= m.ttft_seconds <= m.e2e_seconds and m.decode_seconds >= 0
    assert llm.engine.runner.num_compiles == compiles and llm.warm_up_seconds > 0


def test_chat_and_bad_input(llm):
    out = llm.chat([[{"role": "user", "content": "hi"}]], SamplingParams(max_tokens=2, ignore_eos=True))
    assert len(out[0].output_ids) == 2
    with pytest.raises(ValueError, match="prompt is empty"):
        llm.generate([""], SamplingParams())
    with pytest.raises(ValueError, match="got 2 prompts but 1 SamplingParams"):
        llm.generate(["a", "b"], [SamplingParams()])
