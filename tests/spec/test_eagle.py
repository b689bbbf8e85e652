"""The draft head inside the engine: its KV (one more layer of the pool) matches a direct computation
from the target's features after plain, chunked, prefix-cached and speculative steps; the drafted
tree's candidates match a dense draft forward; outputs stay equal to plain decoding."""

import dataclasses
import functools

import jax.numpy as jnp
import numpy as np
import pytest

from jaxinfer.config import CacheConfig, EngineConfig, SchedulerConfig, SpeculativeConfig
from jaxinfer.engine.engine import Engine
from jaxinfer.models import init_random
from jaxinfer.sampling_params import SamplingParams
from jaxinfer.spec.batch import DraftShape, build_draft_input
from jaxinfer.spec.draft_head import DraftHeadConfig, causal_mask, init_draft_head
from jaxinfer.spec.programs import DraftProgram
from tests.conftest import tiny_config
from tests.engine import tiny_engine
from tests.models import paged
from tests.spec.test_speculative import OracleDrafter

VOCAB = 64
PROMPTS = [[3 + (i * 7) % 50 for i in range(21)], [40, 41, 42, 43, 40, 41], [10, 11, 12, 13, 14, 10, 11]]
GREEDY = SamplingParams(max_tokens=16, ignore_eos=True)


@functools.cache
def _target():
    return init_random(tiny_config(vocab_size=VOCAB, num_layers=4), seed=5, scale=2.0)


@functools.cache
def _head():
    cfg = _target().config
    config = dataclasses.replace(DraftHeadConfig.from_target(cfg, draft_vocab_size=48), feature_layers=(0, 2, 1))
    head = init_draft_head(config, seed=6)
    head.d2t[...] = jnp.asarray(np.random.default_rng(0).permutation(VOCAB)[:48], jnp.int32)
    return head


def _engine(method="eagle", **spec):
    config = EngineConfig(
        cache=CacheConfig(page_size=4, num_pages=96),
        scheduler=SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=16, max_model_len=64, max_prefill_seqs=2,
                                  decode_buckets=(4,), prefill_buckets=(16,), kv_buckets=(64,)),
        max_logprobs=5, speculative=SpeculativeConfig(**{**dict(method=method, depth=3, num_nodes=8, top_k=3,
                                                                  adaptive=False), **spec}))
    return Engine(_target(), tiny_engine.CharTokenizer(), config, draft_head=_head() if method != "off" else None)


@functools.cache
def _plain_outputs():
    return [o.output_ids for o in _engine("off").generate(PROMPTS, GREEDY)]


def _features(tokens):
    """Target features of every token by a direct prefill (no engine)."""
    model = _target()
    kv = paged.new_cache(model.config)
    pages = np.arange(-(-len(tokens) // paged.PAGE_SIZE), dtype=np.int32)
    from jaxinfer.layers.attention import RaggedMeta
    n = len(tokens)
    meta = RaggedMeta.prompts(np.arange(n, dtype=np.int32), np.array([n], np.int32), pages[None],
                              np.array([0, n], np.int32))
    rows = jnp.arange(n, dtype=jnp.int32)
    _, _, features = model(jnp.asarray(tokens, jnp.int32), rows, kv, meta, rows, _head().config.feature_layers)
    return np.asarray(features)


def _expected_draft_kv(tokens):
    """Draft K/V of pairs (feature p, token p+1) at positions p = 0 .. len-2."""
    head, embed = _head(), _target().embed
    features = _features(tokens)
    _, k, v = head.project(head.fuse(jnp.asarray(features[:-1])), embed(jnp.asarray(tokens[1:])),
                           jnp.arange(len(tokens) - 1))
    return np.asarray(k), np.asarray(v)


def _draft_kv_of(eng, seq, count):
    """The draft layer's K/V of seq's first count positions, read from the pool: [count, K, D]."""
    kv, page_size = eng.runner.kv, eng.block_manager.page_size
    offset = eng.model_config.num_layers * kv.num_pages
    positions = np.arange(count)
    pages = np.asarray(seq.pages)[positions // page_size] + offset
    return (np.asarray(kv.k)[:, pages, positions % page_size].transpose(1, 0, 2),
            np.asarray(kv.v)[:, pages, positions % page_size].transpose(1, 0, 2))


def _run_until(eng, request_id, min_tokens, finished=None):
    """Step until the request has min_tokens outputs; finished requests' outputs go into ``finished``."""
    while True:
        for out in eng.step():
            if out.finished and finished is not None:
                finished[out.request_id] = out.output_ids
        seq = eng.scheduler.find(request_id)
        if seq is not None and len(seq.output_ids) >= min_tokens:
            return seq


@pytest.mark.parametrize("mode", ["rounds", "oracle", "bursts"])
def test_draft_kv_matches_a_direct_computation(mode):
    """Chunked prefill (21 tokens in chunks of 16: the pair across the chunk boundary comes from the
    pending feature), decodes and mixed steps, then speculative rounds (with the oracle drafter:
    long accepted paths, whose draft KV the verify step writes). bursts: three requests over a round
    limit of one run as plain bursts of decode steps, which write the draft KV on the device, then
    the last one speculates; its tokens equal plain decoding's."""
    plain = _plain_outputs()
    oracle = mode == "oracle"
    eng = _engine(max_batch=1) if mode == "bursts" else _engine()
    if mode == "bursts":
        bursts = []
        dispatch = eng.runner.dispatch_burst
        eng.runner.dispatch_burst = lambda out, *args, **kw: bursts.append(max(out.steps)) or dispatch(out, *args, **kw)
    if oracle:
        eng.spec.drafter = OracleDrafter({tuple(p): o for p, o in zip(PROMPTS, plain, strict=True)}, VOCAB, seed=9)
    short = SamplingParams(max_tokens=6, ignore_eos=True)  # bursts: then request 0 alone speculates
    for index, (prompt, params) in enumerate(zip(PROMPTS, [GREEDY] + [short if mode == "bursts" else GREEDY] * 2,
                                                 strict=True)):
        eng.add_request(prompt, params, request_id=str(index))
    outputs = {}
    seq = _run_until(eng, "0", 12, outputs)
    tokens = seq.prompt_ids + seq.output_ids
    computed = seq.num_computed
    assert computed == len(tokens) - 1
    want_k, want_v = _expected_draft_kv(tokens[:computed])
    got_k, got_v = _draft_kv_of(eng, seq, computed - 1)
    np.testing.assert_allclose(got_k, want_k, atol=2e-4, rtol=2e-4)
    np.testing.assert_allclose(got_v, want_v, atol=2e-4, rtol=2e-4)
    if oracle:
        assert eng.spec.stats.accepted_tokens >= 4
    while eng.has_unfinished:
        outputs.update((o.request_id, o.output_ids) for o in eng.step() if o.finished)
    if mode == "bursts":
        assert max(bursts) > 1 and eng.spec.stats.rounds > 0
        assert [outputs[str(i)] for i in range(len(PROMPTS))] == [plain[0], plain[1][:6], plain[2][:6]]
    tiny_engine.assert_no_leaks(eng)


def test_prefix_hit_keeps_the_cached_draft_kv():
    eng = _engine()
    first = eng.generate([PROMPTS[0]], GREEDY)[0]
    follow = PROMPTS[0] + first.output_ids[:6] + [5, 6, 7]
    eng.add_request(follow, GREEDY, request_id="f")
    seq = _run_until(eng, "f", 3)
    assert eng.block_manager.prefix_hit_tokens >= 24
    tokens = seq.prompt_ids + seq.output_ids
    want_k, _ = _expected_draft_kv(tokens[:seq.num_computed])
    got_k, _ = _draft_kv_of(eng, seq, seq.num_computed - 1)
    np.testing.assert_allclose(got_k, want_k, atol=2e-4, rtol=2e-4)
    while eng.has_unfinished:
        eng.step()
    tiny_engine.assert_no_leaks(eng)


def test_drafted_candidates_match_a_dense_draft_forward():
    eng = _engine()
    eng.add_request(PROMPTS[2], GREEDY, request_id="x")
    seq = _run_until(eng, "x", 1)  # prefilled: the root is the first sampled token
    tokens = seq.prompt_ids + seq.output_ids
    length = seq.num_computed
    shape = DraftShape(1, 64, 3, 3, 3)
    out = eng.runner.run(DraftProgram(shape), build_draft_input([seq], 1, eng.runner.builder.max_pages_per_seq))
    head, embed = _head(), _target().embed
    features = _features(tokens[:length])
    hidden = head.fuse(jnp.asarray(features))
    pairs = jnp.asarray(tokens[1:length + 1])
    n = length
    empty = jnp.zeros((0, head.config.num_kv_heads, head.config.head_dim))
    h, _, _ = head(hidden, embed(pairs), jnp.arange(n), empty, empty, causal_mask(n))
    logp = np.asarray(jax_log_softmax(head.logits(h[-1:])))[0]
    top = np.argsort(-logp, kind="stable")[:3]
    d2t = np.asarray(head.d2t[...])
    np.testing.assert_array_equal(out["tokens"][0, :3], d2t[top])
    np.testing.assert_allclose(out["scores"][0, :3], logp[top], atol=1e-4)
    assert (out["parents"][0, :3] == -1).all() and (out["depths"][0, :3] == 1).all()
    # level 2 under the best first-level node: one more pair (the draft's own hidden, that token) at n
    hidden2 = jnp.concatenate([hidden, h[-1:]], axis=0)
    pairs2 = jnp.concatenate([pairs, jnp.asarray(d2t[top[:1]])])
    h2, _, _ = head(hidden2, embed(pairs2), jnp.arange(n + 1), empty, empty, causal_mask(n + 1))
    logp2 = np.asarray(jax_log_softmax(head.logits(h2[-1:])))[0]
    top2 = np.argsort(-logp2, kind="stable")[:3]
    np.testing.assert_array_equal(out["tokens"][0, 3:6], d2t[top2])
    np.testing.assert_allclose(out["scores"][0, 3:6], logp[top[0]] + logp2[top2], atol=1e-4)
    assert (out["parents"][0, 3:6] == 0).all() and (out["depths"][0, 3:12] == 2).all()
    while eng.has_unfinished:
        eng.step()


def jax_log_softmax(x):
    import jax
    return jax.nn.log_softmax(x, axis=-1)


def test_eagle_and_heterospec_greedy_equal_plain():
    plain = _plain_outputs()
    eng = _engine("eagle")
    eng.spec.drafter.record = True
    assert [o.output_ids for o in eng.generate(PROMPTS, GREEDY)] == plain
    tiny_engine.assert_no_leaks(eng)
    records = np.asarray(eng.spec.drafter.records)
    assert len(records) == eng.spec.stats.requests and (records[:, 1] >= 0).all()
    assert records[:, 2].sum() == eng.spec.stats.accepted_tokens
    thresholds = tuple(float(q) for q in np.quantile(records[:, 0], [0.2, 0.4, 0.6]))
    eng = _engine("heterospec", thresholds=thresholds)
    assert [o.output_ids for o in eng.generate(PROMPTS, GREEDY)] == plain
    tiny_engine.assert_no_leaks(eng)
    counts = eng.spec.drafter.bin_counts
    assert all(counts[i] > 0 for i in range(4)), counts  # every variant (depth, budget) was used


def test_heterospec_without_thresholds_is_refused():
    with pytest.raises(ValueError, match="calibrate_spec"):
        _engine("heterospec")
    with pytest.raises(ValueError, match="needs a draft head"):
        Engine(_target(), tiny_engine.CharTokenizer(), EngineConfig(speculative=SpeculativeConfig(method="eagle")))


def test_drafting_stops_where_the_budget_reaches():
    """A tree of b nodes holds paths of b - 1 drafts: EAGLE drafts no deeper; HeteroSpec drafts at least
    to its base depth (its entropy is taken there) and its variants no deeper than their budgets."""
    assert _engine(depth=5, num_nodes=3).spec.drafter.depth == 2
    assert _engine(depth=3, num_nodes=8).spec.drafter.depth == 3
    heterospec = _engine("heterospec", depth=4, num_nodes=4, thresholds=(1.0, 2.0, 3.0))
    # variants (4, 4), (6, 3), (5, 3), (4, 4): reach 3, base depth 4
    assert heterospec.spec.config.variants() == ((4, 4), (6, 3), (5, 3), (4, 4))
    assert heterospec.spec.drafter.depth == 4 and heterospec.spec.path_len == 4
