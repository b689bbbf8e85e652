"""jaxinfer.bench's accounting on a tiny engine: decode tokens of bursts, and defaults that follow the
engine's (no model download)."""

import pytest

from jaxinfer import bench
from jaxinfer.config import SchedulerConfig
from jaxinfer.sampling_params import SamplingParams
from tests.engine import tiny_engine


def test_parser_defaults_follow_the_engine_config():
    args = bench.build_parser().parse_args(["latency"])
    assert args.decode_steps == SchedulerConfig().decode_steps


def test_run_counts_every_token_decoded_in_bursts():
    engine = tiny_engine.engine(decode_steps=4)
    stats = bench.run(engine, [[5, 6, 7], [8, 9]], [SamplingParams(max_tokens=10, ignore_eos=True)] * 2)
    assert stats.output_tokens == 20
    assert stats.decode_tokens == 18  # all but each request's first token, which its prefill step samples
    assert stats.decode_seconds > 0
    assert engine.metrics().num_steps >= 9  # decode steps inside bursts count as steps


class FakeTokenizer:
    vocab_size = 1000

    def encode(self, text):
        return [ord(c) for c in text]


def test_without_the_shared_folder_prompts_are_synthetic_and_the_trace_is_asked_for(monkeypatch, tmp_path):
    monkeypatch.setenv("JAXINFER_SHARED", str(tmp_path / "missing"))
    tokens = bench.text_tokens(FakeTokenizer())
    assert len(tokens) == bench.SYNTHETIC_TOKENS and 256 <= min(tokens) and max(tokens) < 1000
    assert tokens == bench.text_tokens(FakeTokenizer())  # the same prompts every run
    with pytest.raises(FileNotFoundError, match="AzureLLMInferenceTrace_conv.csv not found"):
        bench.main(["throughput", "--dataset", "azure"])
    essays = tmp_path / "shared" / "data" / "longtext" / "PaulGrahamEssays"
    essays.mkdir(parents=True)
    (essays / "a.txt").write_text("abc")
    monkeypatch.setenv("JAXINFER_SHARED", str(tmp_path / "shared"))
    assert bench.text_tokens(FakeTokenizer()) == [97, 98, 99]
