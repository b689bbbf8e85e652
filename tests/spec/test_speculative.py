"""Speculative decoding in the engine: outputs equal plain decoding (greedy token for token, seeded
sampling token for token), the emitted distribution is the target's, and no page leaks."""

import numpy as np
import pytest
from scipy import stats

from jaxinfer.config import CacheConfig, EngineConfig, SchedulerConfig, SpeculativeConfig
from jaxinfer.engine.engine import Engine
from jaxinfer.models import model_from_tensors
from jaxinfer.sampling_params import SamplingParams
from jaxinfer.spec.decoder import PROBE_EVERY, PROBE_STEPS, SpeculativeDecoder
from jaxinfer.spec.tree import trie
from tests.conftest import tiny_config
from tests.engine import tiny_engine
from tests.models import numpy_llama

PROMPTS = [[5, 6, 7, 8, 9, 5, 6, 7], [40, 41, 42, 43, 40, 41], [10, 11, 12], [20, 21, 22, 23, 24, 25, 26]]
GREEDY = SamplingParams(max_tokens=24, ignore_eos=True)


class OracleDrafter:
    """Trees around the known continuation (from a plain run): a true prefix of random length, often
    one wrong guess after it, and random side branches; random sizes up to the budget."""

    def __init__(self, truth: dict[tuple, list[int]], vocab: int, depth: int = 5, seed: int = 0, full: bool = False):
        self.truth, self.vocab, self.depth, self.full = truth, vocab, depth, full
        self.rng = np.random.default_rng(seed)

    def propose(self, seqs, num_nodes):
        trees = []
        for seq in seqs:
            rng = self.rng
            future = self.truth[tuple(seq.prompt_ids)][len(seq.output_ids):]
            main = list(future[:rng.integers(0, self.depth + 1)])
            if rng.random() < 0.5:
                main.append(int(rng.integers(3, self.vocab)))
            paths = [main] + [list(rng.integers(3, self.vocab, rng.integers(1, 4))) for _ in range(rng.integers(0, 3))]
            rng.shuffle(paths)
            size = num_nodes if self.full else int(rng.integers(1, num_nodes + 1))
            if self.full:
                paths.append(list(rng.integers(3, self.vocab, num_nodes)))  # fills the budget
            trees.append(trie(seq.output_ids[-1], paths, size))
        return trees

    def observe(self, seqs, result):
        pass


def _outputs(eng, params, prompts=PROMPTS):
    return [o.output_ids for o in eng.generate(prompts, params)]


@pytest.fixture(scope="module")
def plain():
    return tiny_engine.engine()


def _oracle_engine(**scheduler):
    """Rounds with the budgets of HeteroSpec's variants (6, 8 and 12 nodes, paths up to 5 deep) and
    trees from a test drafter (set per test), no draft head."""
    eng = tiny_engine.engine(speculative=SpeculativeConfig(method="ngram", adaptive=False), **scheduler)
    config = SpeculativeConfig(method="heterospec", depth=3, num_nodes=12, max_batch=4, adaptive=False)
    eng.spec = SpeculativeDecoder(config, eng.scheduler, eng.runner)
    return eng


@pytest.fixture(scope="module")
def spec_engine():
    return _oracle_engine()


def test_variants_and_budgets():
    config = SpeculativeConfig(method="heterospec", depth=3, num_nodes=12)
    assert config.extra_depth == 2
    assert config.variants() == ((3, 12), (5, 6), (4, 8), (3, 12))
    assert SpeculativeConfig(method="eagle", depth=3, num_nodes=12).variants() == ((3, 12),)
    with pytest.raises(ValueError, match="unknown speculative method"):
        SpeculativeConfig(method="medusa")


def test_ngram_greedy_equals_plain_greedy(plain):
    eng = tiny_engine.engine(speculative=SpeculativeConfig(method="ngram", depth=4, num_nodes=8, adaptive=False))
    assert _outputs(eng, GREEDY) == _outputs(plain, GREEDY)
    assert eng.spec.stats.rounds > 0 and eng.spec.stats.accepted_tokens > 0
    tiny_engine.assert_no_leaks(eng)


def test_tree_rounds_with_every_budget_equal_plain_greedy(plain, spec_engine):
    expected = _outputs(plain, GREEDY)
    truth = {tuple(p): out for p, out in zip(PROMPTS, expected, strict=True)}
    spec_engine.spec.drafter = OracleDrafter(truth, tiny_engine.VOCAB, seed=1)
    before = spec_engine.runner.num_compiles
    assert _outputs(spec_engine, GREEDY) == expected
    stats = spec_engine.spec.stats
    assert stats.accepted_tokens > stats.rounds  # long paths were accepted
    assert stats.mean_accepted_length > 1.5
    shapes = {shape.num_nodes for shape in spec_engine.runner.executables() if hasattr(shape, "num_nodes")}
    assert {6, 8, 12} <= shapes
    assert spec_engine.runner.num_compiles >= before
    tiny_engine.assert_no_leaks(spec_engine)


def test_seeded_sampling_equals_plain_sampling_token_for_token(plain, spec_engine):
    params = [SamplingParams(max_tokens=20, temperature=t, top_k=k, top_p=p, seed=s, ignore_eos=True)
              for t, k, p, s in ((1.0, 0, 1.0, 3), (0.7, 12, 1.0, 4), (1.3, 0, 0.9, 5), (1.0, 5, 0.95, 6))]
    expected = [o.output_ids for o in plain.generate(PROMPTS, params)]
    truth = {tuple(p): out for p, out in zip(PROMPTS, expected, strict=True)}
    spec_engine.spec.drafter = OracleDrafter(truth, tiny_engine.VOCAB, seed=2)
    accepted = spec_engine.spec.stats.accepted_tokens
    assert [o.output_ids for o in spec_engine.generate(PROMPTS, params)] == expected
    assert spec_engine.spec.stats.accepted_tokens > accepted
    tiny_engine.assert_no_leaks(spec_engine)


def test_logprobs_and_stops_inside_a_round_match_plain(plain, spec_engine):
    reference = _outputs(plain, GREEDY)
    stop = reference[0][9]  # a token in the middle of the first output: the round is cut there
    params = SamplingParams(max_tokens=24, ignore_eos=True, logprobs=3, stop_token_ids=(stop,))
    expected = plain.generate(PROMPTS, params)
    truth = {tuple(p): out for p, out in zip(PROMPTS, reference, strict=True)}
    spec_engine.spec.drafter = OracleDrafter(truth, tiny_engine.VOCAB, seed=3)
    got = spec_engine.generate(PROMPTS, params)
    for a, b in zip(got, expected, strict=True):
        assert a.output_ids == b.output_ids and a.finish_reason == b.finish_reason
        for x, y in zip(a.logprobs, b.logprobs, strict=True):
            assert x.token_id == y.token_id and x.logprob == pytest.approx(y.logprob, abs=1e-4)
            assert list(x.top) == list(y.top)
    assert got[0].finish_reason == "stop" and len(got[0].output_ids) <= 10
    tiny_engine.assert_no_leaks(spec_engine)


def test_large_batches_and_penalties_fall_back_to_plain_decoding(plain):
    eng = tiny_engine.engine(speculative=SpeculativeConfig(method="ngram", num_nodes=8, max_batch=2, adaptive=False))
    assert _outputs(eng, GREEDY) == _outputs(plain, GREEDY)  # 4 decodes > max_batch 2 for a while
    assert eng.spec.stats.fallback_steps > 0
    penalized = SamplingParams(max_tokens=12, repetition_penalty=1.3, ignore_eos=True)
    fallback = eng.spec.stats.fallback_steps
    assert _outputs(eng, penalized, PROMPTS[:1]) == _outputs(plain, penalized, PROMPTS[:1])
    # 11 plain decode steps after the prompt's, in bursts of up to decode_steps=4: 3 to 10 decisions
    assert fallback + 3 <= eng.spec.stats.fallback_steps <= fallback + 10
    tiny_engine.assert_no_leaks(eng)


def test_trees_shrink_under_page_pressure_and_at_the_context_limit_without_leaks(plain):
    small = dict(num_pages=24, max_model_len=40, kv_buckets=(40,))
    params = SamplingParams(max_tokens=40, ignore_eos=True)  # runs into the context limit
    expected = tiny_engine.engine(**small).generate(PROMPTS, params)
    assert all(o.finish_reason == "length" for o in expected)
    eng = _oracle_engine(**small)
    truth = {tuple(p): o.output_ids for p, o in zip(PROMPTS, expected, strict=True)}
    eng.spec.drafter = OracleDrafter(truth, tiny_engine.VOCAB, seed=4, full=True)
    assert [o.output_ids for o in eng.generate(PROMPTS, params)] == [o.output_ids for o in expected]
    tiny_engine.assert_no_leaks(eng)


def test_prefix_cache_shares_only_committed_kv(plain, spec_engine):
    """Pages a speculative run committed are reused by a later request: its output is right only if
    the accepted paths' KV was moved into place and rejected nodes' KV never became part of it."""
    first = _outputs(plain, GREEDY, PROMPTS[:1])[0]
    spec_engine.spec.drafter = OracleDrafter({tuple(PROMPTS[0]): first}, tiny_engine.VOCAB, seed=5)
    assert _outputs(spec_engine, GREEDY, PROMPTS[:1])[0] == first
    follow_up = PROMPTS[0] + first[:20]
    hits = spec_engine.block_manager.prefix_hit_tokens
    expected = _outputs(plain, GREEDY, [follow_up])
    spec_engine.spec.drafter = OracleDrafter({tuple(follow_up): expected[0]}, tiny_engine.VOCAB, seed=6)
    assert _outputs(spec_engine, GREEDY, [follow_up]) == expected
    assert spec_engine.block_manager.prefix_hit_tokens >= hits + 24  # 6 pages of 4 came from the cache
    tiny_engine.assert_no_leaks(spec_engine)


def test_emitted_tokens_follow_the_target_distribution():
    """Many seeds, a 12-token vocabulary, bushy random trees: the second and third emitted tokens
    (speculative rounds) against the exact float64 marginals of an independent numpy forward pass."""
    vocab, prompt, temperature = 12, [3, 7, 5], 1.0
    cfg = tiny_config(vocab_size=vocab, num_layers=1)
    tensors = numpy_llama.random_tensors(cfg, seed=7)
    tensors["model.embed_tokens.weight"] *= 0.5  # a flatter distribution: many tokens are likely
    config = EngineConfig(cache=CacheConfig(page_size=4, num_pages=96),
                          scheduler=SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=16, max_model_len=16,
                                                    decode_buckets=(4,), prefill_buckets=(16,), kv_buckets=(16,)),
                          max_logprobs=5, speculative=SpeculativeConfig(method="ngram", num_nodes=10, max_batch=4,
                                                                                   adaptive=False))
    eng = Engine(model_from_tensors(cfg, tensors.items()), tiny_engine.CharTokenizer(), config)
    rng = np.random.default_rng(8)

    class Bushy:
        def propose(self, seqs, num_nodes):  # 3 children of the root, 2 children under each
            return [trie(seq.output_ids[-1], [[int(a), int(b)] for a in rng.choice(vocab, 3, replace=False)
                                              for b in rng.choice(vocab, 2, replace=False)], num_nodes)
                    for seq in seqs]

        def observe(self, seqs, result):
            pass

    eng.spec.drafter = Bushy()
    samples = 1200
    params = [SamplingParams(max_tokens=3, temperature=temperature, seed=s, ignore_eos=True) for s in range(samples)]
    outputs = np.asarray([o.output_ids for o in eng.generate([prompt] * samples, params)])
    assert eng.spec.stats.accepted_tokens > samples // 4  # the trees were used, not just the bonus tokens

    def probs(tokens):
        logits = numpy_llama.forward(tensors, cfg, tokens)[-1] / temperature
        p = np.exp(logits - logits.max())
        return p / p.sum()

    p1 = probs(prompt)
    p2 = {a: probs(prompt + [a]) for a in range(vocab)}
    marginal2 = sum(p1[a] * p2[a] for a in range(vocab))
    marginal3 = sum(p1[a] * p2[a][b] * probs(prompt + [a, b]) for a in range(vocab) for b in range(vocab))
    for position, expected in ((1, marginal2), (2, marginal3)):
        counts = np.bincount(outputs[:, position], minlength=vocab)
        keep = expected * samples >= 5
        observed = np.append(counts[keep], counts[~keep].sum())
        wanted = np.append(expected[keep], expected[~keep].sum()) * samples
        if wanted[-1] == 0:
            observed, wanted = observed[:-1], wanted[:-1]
        assert stats.chisquare(observed, wanted).pvalue > 1e-3, (position, observed, wanted.round(1))
    tiny_engine.assert_no_leaks(eng)


class _Decoding:
    """What the fallback reads of a decoding request: its sampling parameters."""

    params = SamplingParams()


def _adaptive_decoder():
    """An n-gram engine's speculative decoder (adaptive) and one decoding request."""
    return tiny_engine.engine(speculative=SpeculativeConfig(method="ngram", max_batch=4)).spec, [_Decoding()]


def test_adaptive_fallback_follows_the_measured_speeds():
    spec, seqs = _adaptive_decoder()
    for _ in range(PROBE_STEPS):  # plain first, over a few steps: its speed is measured
        assert not spec.eligible(seqs, False)
    spec.observe_step("plain", 1, 1, 0.150)  # a first step that faulted pages in: 6.7 tokens/s
    spec.observe_step("plain", 1, 1, 0.010)  # 100 tokens/s
    assert not spec.eligible(seqs, False)  # two samples: still measuring
    spec.observe_step("plain", 1, 1, 0.010)
    for _ in range(PROBE_STEPS):  # then rounds
        assert spec.eligible(seqs, False)
        spec.observe_step("spec", 1, 3, 0.040)  # 75 tokens/s: rounds do not pay (the slow first plain step
    decisions = [spec.eligible(seqs, False) for _ in range(200)]  # does not decide: medians)
    assert sum(decisions) <= (200 // 64 + 1) * PROBE_STEPS  # only the periodic re-measurements speculate
    for _ in range(20):
        spec.observe_step("spec", 1, 6, 0.040)  # 150 tokens/s now
    assert sum(spec.eligible(seqs, False) for _ in range(100)) >= 100 - 2 * PROBE_STEPS
    assert spec.rate("spec", 1) == 150 and spec.rate("plain", 1) == 100
    for _ in range(20):
        spec.observe_step("spec", 1, 1, 0.040)  # 25 tokens/s: rounds lose again
    decisions = [spec.eligible(seqs, False) for _ in range(4000)]
    # probe cycles of 64, 128, ... 1024 decisions: a handful of probe rounds, not 4000 / 64 * 3 = 187
    assert 2 * PROBE_STEPS <= sum(decisions) <= 10 * PROBE_STEPS
    starts = [i for i in range(1, len(decisions)) if decisions[i] and not decisions[i - 1]]
    assert starts[-1] - starts[-2] >= 512  # the interval grew
    assert not spec.eligible(seqs, True)  # steps with prompt chunks never speculate


def test_adaptive_probe_gives_up_after_one_slow_round_and_rates_are_tokens_over_seconds():
    spec, seqs = _adaptive_decoder()
    for _ in range(PROBE_STEPS):
        assert not spec.eligible(seqs, False)
        spec.observe_step("plain", 1, 4, 0.040)  # bursts of 4 tokens: 100 tokens/s
    assert spec.eligible(seqs, False)  # the probe's first round
    spec.observe_step("spec", 1, 1, 0.040)  # 25 tokens/s, below half of plain: the probe ends
    assert not any(spec.eligible(seqs, False) for _ in range(PROBE_EVERY - PROBE_STEPS - 1))
    # the next cycle probes again, and a round that is slow but not hopeless gets all its probe rounds
    decisions = []
    for _ in range(2 * PROBE_STEPS):
        decisions.append(spec.eligible(seqs, False))
        spec.observe_step("spec" if decisions[-1] else "plain", 1, 3 if decisions[-1] else 4, 0.040)
    assert decisions == [False] * PROBE_STEPS + [True] * PROBE_STEPS
    # rounds emit 1-4 tokens each: their speed is all tokens over all seconds, without the longest
    # sample (137.5 tokens/s here, where the median of the rates says 100)
    for tokens, seconds in ((1, 0.02), (4, 0.02), (2, 0.02), (4, 0.02), (1, 0.5)):
        spec.observe_step("spec", 1, tokens, seconds)
    assert spec.rate("spec", 1) == pytest.approx(11 / 0.08)
