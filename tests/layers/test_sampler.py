import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer.layers.sampler import sample

V = 16


def _keys(n, seed=0):
    return jax.random.split(jax.random.key(seed), n)


def _draw(logits, temperature, top_p, top_k, n, seed=0):
    """n independent draws for a single row of logits."""
    logits = jnp.broadcast_to(jnp.asarray(logits, jnp.float32), (n, len(logits)))
    full = lambda v, dt: jnp.full((n,), v, dt)  # noqa: E731
    fn = jax.jit(sample)
    return np.asarray(fn(logits, full(temperature, jnp.float32), full(top_p, jnp.float32),
                         full(top_k, jnp.int32), _keys(n, seed)))


def test_greedy_rows_take_argmax_even_beside_sampled_rows():
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.standard_normal((4, V)), jnp.float32)
    tokens = sample(logits, jnp.asarray([0.0, 1.0, 0.0, 2.0]), jnp.ones(4), jnp.zeros(4, jnp.int32), _keys(4))
    np.testing.assert_array_equal(np.asarray(tokens)[[0, 2]], np.asarray(logits).argmax(-1)[[0, 2]])


def test_top_k_and_top_p_never_emit_excluded_tokens():
    logits = np.linspace(3.0, -3.0, V)  # token i is the i-th most likely
    assert set(_draw(logits, 1.5, 1.0, 3, 2000)) <= {0, 1, 2}
    probs = np.exp(logits) / np.exp(logits).sum()
    # top_p keeps the smallest prefix whose mass reaches p
    keep = int(np.searchsorted(np.cumsum(probs), 0.6) + 1)
    drawn = _draw(logits, 1.0, 0.6, 0, 4000)
    assert set(drawn) <= set(range(keep))
    assert len(set(drawn)) == keep  # and every kept token does occur


def test_same_seed_reproduces_and_other_seed_differs():
    logits = np.zeros(V)
    a, b = _draw(logits, 1.0, 1.0, 0, 64, seed=7), _draw(logits, 1.0, 1.0, 0, 64, seed=7)
    np.testing.assert_array_equal(a, b)
    assert (a != _draw(logits, 1.0, 1.0, 0, 64, seed=8)).any()


def test_temperature_sampling_matches_softmax_distribution():
    """Chi-square goodness of fit: 20000 draws, 15 degrees of freedom; the 0.999 quantile is 37.7."""
    rng = np.random.default_rng(1)
    logits = rng.standard_normal(V) * 1.5
    temperature = 0.7
    n = 20000
    counts = np.bincount(_draw(logits, temperature, 1.0, 0, n, seed=3), minlength=V)
    expected = np.exp(logits / temperature)
    expected = expected / expected.sum() * n
    chi2 = ((counts - expected) ** 2 / expected).sum()
    assert chi2 < 37.7, chi2
