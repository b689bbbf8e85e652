"""A tiny random model behind a real Engine, with a character tokenizer stand-in."""

import functools

from jaxinfer.config import CacheConfig, EngineConfig, SchedulerConfig, SparsePrefillConfig, SpeculativeConfig
from jaxinfer.engine.engine import Engine
from jaxinfer.models import init_random
from tests.conftest import tiny_config

VOCAB = 64
EOS = 2


class CharTokenizer:
    """id i >= 3 <-> one lowercase letter; 0-2 are special (2 = EOS)."""

    eos_ids = (EOS,)

    def encode(self, text):
        return [3 + (ord(c) - 97) % 26 for c in text]

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(97 + (i - 3) % 26) for i in ids if i >= 3 or not skip_special_tokens)


@functools.cache
def model(quant_spec=None):
    """The tiny model; with ``quant_spec`` the same random weights as GGUF blocks."""
    return init_random(tiny_config(vocab_size=VOCAB), seed=11, scale=2.0, quant_spec=quant_spec)


def engine(num_pages=64, page_size=4, enable_prefix_caching=True, attention_impl="auto",
           sparse_prefill=None, speculative=None, quant_spec=None, **scheduler):
    sched = dict(max_num_seqs=4, max_num_batched_tokens=16, max_model_len=64, max_prefill_seqs=2,
                 decode_buckets=(4,), prefill_buckets=(16,), kv_buckets=(64,))
    sched.update(scheduler)
    config = EngineConfig(cache=CacheConfig(page_size=page_size, num_pages=num_pages,
                                            enable_prefix_caching=enable_prefix_caching),
                          scheduler=SchedulerConfig(**sched), max_logprobs=5, attention_impl=attention_impl,
                          sparse_prefill=sparse_prefill or SparsePrefillConfig(mode="off"),
                          speculative=speculative or SpeculativeConfig())
    return Engine(model(quant_spec), CharTokenizer(), config)


def assert_no_leaks(eng):
    blocks = eng.block_manager
    assert blocks.num_free == blocks.num_pages
    assert all(count == 0 for count in blocks.ref_counts)
    assert not eng.has_unfinished and not eng._streams
