"""Sampler tests: greedy, batch independence, reproducibility, truncation, output distribution, penalties, logprobs.

Every reference here is an independent numpy implementation in float64.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinfer.layers.sampler import SamplingArrays, apply_penalties, key_data_from_seed, logprobs, sample

V = 32
NUM_DRAWS = 20000
# 0.999 quantiles of the chi-square distribution with 1..15 degrees of freedom (scipy.stats.chi2.ppf(0.999, df)).
CHI2_999 = [10.8, 13.8, 16.3, 18.5, 20.5, 22.5, 24.3, 26.1, 27.9, 29.6, 31.3, 32.9, 34.5, 36.1, 37.7]

_sample = jax.jit(sample)
_penalize = jax.jit(apply_penalties)
_logprobs = jax.jit(logprobs, static_argnames="num_top")


def _arrays(n: int, *, temperature=1.0, top_p=1.0, top_k=0, min_p=0.0, repetition_penalty=1.0,
            presence_penalty=0.0, frequency_penalty=0.0, seed=0, index=None) -> SamplingArrays:
    """n rows; each parameter is a scalar for all rows or a sequence of n; index defaults to 0..n-1."""
    full = lambda value, dtype: jnp.asarray(np.broadcast_to(np.asarray(value, dtype), (n,)))
    seeds = np.broadcast_to(np.asarray(seed, np.uint64), (n,))
    return SamplingArrays(
        temperature=full(temperature, np.float32), top_p=full(top_p, np.float32), top_k=full(top_k, np.int32),
        min_p=full(min_p, np.float32), repetition_penalty=full(repetition_penalty, np.float32),
        presence_penalty=full(presence_penalty, np.float32), frequency_penalty=full(frequency_penalty, np.float32),
        key_data=jnp.asarray(np.stack([key_data_from_seed(int(s)) for s in seeds])),
        index=full(np.arange(n) if index is None else index, np.int32))


def _draws(logits: np.ndarray, n: int, **params) -> np.ndarray:
    """n draws from one row of logits: one request at token indices 0..n-1."""
    batch = jnp.broadcast_to(jnp.asarray(logits, jnp.float32), (n, len(logits)))
    return np.asarray(_sample(batch, _arrays(n, **params)))


def _truncated_probs(logits: np.ndarray, temperature: float, top_k: int = 0, top_p: float = 1.0,
                     min_p: float = 0.0) -> tuple[np.ndarray, float]:
    """The distribution a stochastic row samples from, and how close a token that top-k left comes to the top-p or
    min-p boundary (inf when neither is on)."""
    scaled = np.asarray(logits, np.float64) / temperature
    probs = np.exp(scaled - scaled.max())
    probs /= probs.sum()
    order = np.argsort(-scaled, kind="stable")
    candidates = order[: top_k or len(order)]
    renormalized = probs[candidates] / probs[candidates].sum()
    mass_before = np.cumsum(renormalized) - renormalized
    margin = np.inf
    if top_p < 1:
        candidates = candidates[mass_before < top_p]
        margin = np.abs(mass_before[1:] - top_p).min(initial=np.inf)
    if min_p > 0:
        ratio = probs / probs.max()
        margin = min(margin, np.abs(ratio[candidates] - min_p).min())
        candidates = candidates[ratio[candidates] >= min_p]
    kept = np.zeros_like(probs)
    kept[candidates] = probs[candidates]
    return kept / kept.sum(), margin


def _chi2(counts: np.ndarray, probs: np.ndarray) -> float:
    """Pearson's statistic over the tokens with nonzero probability; inf if a zero-probability token was drawn."""
    if counts[probs == 0].any():
        return np.inf
    expected = probs[probs > 0] * counts.sum()
    return float(((counts[probs > 0] - expected) ** 2 / expected).sum())


def test_key_data_from_seed_matches_jax_key():
    np.testing.assert_array_equal(key_data_from_seed(12345), jax.random.key_data(jax.random.key(12345)))
    np.testing.assert_array_equal(key_data_from_seed((7 << 32) | 9), [7, 9])


def test_greedy_rows_take_argmax_beside_stochastic_rows():
    logits = np.random.default_rng(0).standard_normal((8, V)).astype(np.float32)
    temperature = np.array([0, 1.0, 0, 2.0, 0, 0.5, 0, 0], np.float32)
    greedy = temperature == 0
    mixed = _sample(jnp.asarray(logits), _arrays(8, temperature=temperature, top_k=3, top_p=0.9))
    np.testing.assert_array_equal(np.asarray(mixed)[greedy], logits.argmax(-1)[greedy])
    only_greedy = _sample(jnp.asarray(logits), _arrays(8, temperature=0.0, top_k=3, top_p=0.5, min_p=0.2))
    np.testing.assert_array_equal(np.asarray(only_greedy), logits.argmax(-1))


@pytest.mark.parametrize("params", [dict(temperature=1.0), dict(temperature=0.8, top_k=6, top_p=0.9, min_p=0.05)],
                         ids=["untruncated", "truncated"])
def test_row_token_does_not_depend_on_the_batch(params):
    """The same row alone and at position 2 of a batch of 5, whose other rows take both sides of every lax.cond."""
    rng = np.random.default_rng(1)
    row = rng.standard_normal(V).astype(np.float32) * 0.5
    others = rng.standard_normal((5, V)).astype(np.float32)
    others[2] = row
    alone, in_batch = [], []
    for index in range(24):
        alone.append(int(_sample(jnp.asarray(row[None]), _arrays(1, seed=42, index=index, **params))[0]))
        batch = _arrays(5, temperature=[0.0, 1.5, params["temperature"], 0.3, 1.0],
                        top_k=[0, 1, params.get("top_k", 0), 0, 4],
                        top_p=[1.0, 1.0, params.get("top_p", 1.0), 0.3, 1.0],
                        min_p=[0.0, 0.0, params.get("min_p", 0.0), 0.0, 0.5],
                        seed=[1, 2, 42, 3, 4], index=[5, index + 1, index, 0, 7])
        in_batch.append(int(_sample(jnp.asarray(others), batch)[2]))
    assert alone == in_batch
    assert len(set(alone)) >= 4  # the row really samples


def test_same_seed_and_index_reproduce_and_other_indices_and_seeds_differ():
    logits = np.zeros(V, np.float32)
    first = _draws(logits, 256, seed=7)
    np.testing.assert_array_equal(first, _draws(logits, 256, seed=7))
    assert len(set(first)) >= 24  # uniform over 32 tokens: the indices give independent draws
    assert (np.diff(first) != 0).mean() > 0.8
    assert (first != _draws(logits, 256, seed=8)).mean() > 0.8
    assert (first != _draws(logits, 256, seed=7 + (1 << 32))).mean() > 0.8  # the high 32 bits of the seed count


def test_truncation_never_emits_excluded_tokens():
    """512 rows, each with its own logits, seed and random top-k / top-p / min-p, drawn at 8 token indices."""
    n = 512
    rng = np.random.default_rng(2)
    logits = (rng.standard_normal((n, V)) * 2).astype(np.float32)
    temperature = rng.uniform(0.3, 2.0, n)
    top_k = np.where(rng.random(n) < 0.5, rng.integers(1, V + 1, n), 0)
    top_p = np.where(rng.random(n) < 0.5, rng.uniform(0.05, 1.0, n), 1.0)
    min_p = np.where(rng.random(n) < 0.5, rng.uniform(0.0, 0.5, n), 0.0)
    allowed, margins = zip(*(_truncated_probs(logits[i], temperature[i], top_k[i], top_p[i], min_p[i])
                             for i in range(n)), strict=True)
    allowed = np.stack(allowed) > 0
    clear = np.array(margins) > 1e-4  # rows too close to a boundary for float32 to decide are not checked
    assert clear.mean() > 0.95
    ranks = np.argsort(np.argsort(-logits, axis=-1), axis=-1)
    drawn_ranks = set()
    for index in range(8):
        arrays = _arrays(n, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, seed=np.arange(n) + 100,
                         index=np.full(n, index))
        tokens = np.asarray(_sample(jnp.asarray(logits), arrays))
        assert allowed[np.arange(n), tokens][clear].all()
        drawn_ranks.update(ranks[np.arange(n), tokens].tolist())
    assert len(drawn_ranks) > 8  # not just argmax


def test_the_top_token_always_survives():
    logits = np.random.default_rng(3).standard_normal((64, V)).astype(np.float32)
    argmax = logits.argmax(-1)
    for params in [dict(top_p=1e-6), dict(top_k=1), dict(min_p=1.0), dict(top_k=3, top_p=1e-6, min_p=1.0)]:
        tokens = _sample(jnp.asarray(logits), _arrays(64, temperature=2.0, seed=np.arange(64), **params))
        np.testing.assert_array_equal(np.asarray(tokens), argmax, err_msg=str(params))


@pytest.mark.parametrize("params", [
    dict(temperature=0.7),
    dict(temperature=1.6),
    dict(temperature=1.4, top_k=6),
    dict(temperature=0.8, top_p=0.7),
    dict(temperature=1.5, min_p=0.08),
    dict(temperature=1.3, top_k=10, top_p=0.8, min_p=0.25),
], ids=str)
def test_draws_follow_the_truncated_softmax(params):
    """Chi-square goodness of fit of 20000 draws of one row against softmax(logits / T) restricted and renormalized
    to the tokens top-k, top-p and min-p keep. The same counts must fail the fit when the temperature is ignored or
    applied twice, so the bound has the power to catch either mistake."""
    logits = np.random.default_rng(4).standard_normal(16).astype(np.float32)
    counts = np.bincount(_draws(logits, NUM_DRAWS, seed=11, **params), minlength=16)
    rules = {name: value for name, value in params.items() if name != "temperature"}
    temperature = params["temperature"]
    probs, margin = _truncated_probs(logits, temperature, **rules)
    assert margin > 1e-3 and (probs[probs > 0] * NUM_DRAWS).min() >= 5  # a well-posed test
    bound = CHI2_999[np.count_nonzero(probs) - 2]
    assert _chi2(counts, probs) < bound
    for wrong_temperature in (1.0, temperature**2):
        assert _chi2(counts, _truncated_probs(logits, wrong_temperature, **rules)[0]) > 3 * bound


def _penalties_numpy(logits, counts, prompt_mask, repetition, presence, frequency):
    out = np.asarray(logits, np.float64).copy()
    for n in range(out.shape[0]):
        for v in range(out.shape[1]):
            if prompt_mask[n, v] or counts[n, v] > 0:
                out[n, v] = out[n, v] / repetition[n] if out[n, v] > 0 else out[n, v] * repetition[n]
            out[n, v] -= frequency[n] * counts[n, v] + presence[n] * (counts[n, v] > 0)
    return out


def test_penalties_match_the_three_rules():
    rng = np.random.default_rng(5)
    n = 6
    logits = (rng.standard_normal((n, V)) * 2).astype(np.float32)
    counts = (rng.poisson(0.6, (n, V)) * (rng.random((n, V)) < 0.5)).astype(np.int32)
    prompt_mask = rng.random((n, V)) < 0.3
    repetition = np.array([1.0, 1.3, 0.8, 1.0, 1.0, 1.2], np.float32)
    presence = np.array([0.0, 0.0, 0.0, 0.5, 0.0, -0.4], np.float32)
    frequency = np.array([0.0, 0.0, 0.0, 0.0, 0.7, 0.3], np.float32)
    arrays = _arrays(n, repetition_penalty=repetition, presence_penalty=presence, frequency_penalty=frequency)
    got = np.asarray(_penalize(jnp.asarray(logits), jnp.asarray(counts), jnp.asarray(prompt_mask), arrays))
    want = _penalties_numpy(logits, counts, prompt_mask, repetition, presence, frequency)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(got[0], logits[0])  # a row with every penalty off is untouched
    assert not np.allclose(got[1:], logits[1:])
    untouched = _penalize(jnp.asarray(logits), jnp.asarray(counts), jnp.asarray(prompt_mask), _arrays(n))
    np.testing.assert_array_equal(np.asarray(untouched), logits)


@pytest.mark.parametrize("num_top", [0, 1, 5])
def test_logprobs_match_numpy_log_softmax(num_top):
    rng = np.random.default_rng(6)
    logits = (rng.standard_normal((4, 64)) * 3).astype(np.float32)
    tokens = rng.integers(0, 64, 4).astype(np.int32)
    token_logprob, top_ids, top_logprobs = _logprobs(jnp.asarray(logits), jnp.asarray(tokens), num_top=num_top)
    wide = logits.astype(np.float64)
    log_softmax = wide - wide.max(-1, keepdims=True)
    log_softmax -= np.log(np.exp(log_softmax).sum(-1, keepdims=True))
    want_ids = np.argsort(-wide, axis=-1)[:, :num_top]
    np.testing.assert_allclose(np.asarray(token_logprob), log_softmax[np.arange(4), tokens], atol=1e-5)
    assert top_ids.shape == top_logprobs.shape == (4, num_top) and top_ids.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(top_ids), want_ids)
    np.testing.assert_allclose(np.asarray(top_logprobs), np.take_along_axis(log_softmax, want_ids, -1), atol=1e-5)


def test_one_compilation_serves_any_parameter_values():
    """Lowered from shapes alone, so no value is static; then run with two very different parameter sets."""
    n = 8
    spec = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype)
    logits = jnp.asarray(np.random.default_rng(7).standard_normal((n, V)), jnp.float32)
    counts, prompt_mask = jnp.ones((n, V), jnp.int32), jnp.zeros((n, V), bool)
    compiled_sample = jax.jit(sample).lower(spec(logits), jax.tree.map(spec, _arrays(n))).compile()
    compiled_penalize = jax.jit(apply_penalties).lower(
        spec(logits), spec(counts), spec(prompt_mask), jax.tree.map(spec, _arrays(n))).compile()
    for arrays in [_arrays(n, temperature=0.0),
                   _arrays(n, temperature=np.linspace(0, 2, n), top_k=3, top_p=0.8, min_p=0.1, seed=5,
                           repetition_penalty=1.5, presence_penalty=0.5, frequency_penalty=0.2)]:
        np.testing.assert_array_equal(compiled_sample(logits, arrays), _sample(logits, arrays))
        np.testing.assert_array_equal(compiled_penalize(logits, counts, prompt_mask, arrays),
                                      _penalize(logits, counts, prompt_mask, arrays))
