"""EAGLE-3 draft head: shapes, masking, incremental use, TTT training, export round trip, d2t."""

import dataclasses
import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxinfer.spec.draft_head import (
    DraftHeadConfig,
    causal_mask,
    default_draft_head_path,
    init_draft_head,
    load_draft_head,
    save_draft_head,
)
from tests.conftest import REPO, tiny_config

E, K, D, VOCAB = 32, 2, 8, 64


def tiny_head_config(**overrides) -> DraftHeadConfig:
    base = dict(hidden_size=E, num_heads=4, num_kv_heads=K, head_dim=D, intermediate_size=48, draft_vocab_size=16,
                feature_layers=(0, 1, 2), rms_norm_eps=1e-5, rope_theta=10000.0)
    base.update(overrides)
    return DraftHeadConfig(**base)


def _inputs(seed, num_tokens):
    rng = np.random.default_rng(seed)
    return (jnp.asarray(rng.standard_normal((num_tokens, E)), jnp.float32),
            jnp.asarray(rng.standard_normal((num_tokens, E)), jnp.float32))


def _empty():
    return jnp.zeros((0, K, D), jnp.float32)


def _train_module():
    spec = importlib.util.spec_from_file_location("train_draft", REPO / "launch" / "train_draft.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_config_from_target_and_dict_round_trip():
    target = tiny_config(num_layers=30)
    config = DraftHeadConfig.from_target(target, 64)
    assert config.feature_layers == (2, 15, 27)
    assert (config.hidden_size, config.num_kv_heads, config.head_dim) == (64, 2, 16)
    assert DraftHeadConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="draft_vocab_size"):
        DraftHeadConfig.from_target(target, 0)
    with pytest.raises(ValueError, match="num_kv_heads"):
        tiny_head_config(num_kv_heads=3)


def test_shapes_and_dtypes():
    head = init_draft_head(tiny_head_config())
    features = jnp.ones((5, 3 * E))
    hidden = head.fuse(features)
    embeds, _ = _inputs(0, 5)
    out, k, v = head(hidden, embeds, jnp.arange(5), _empty(), _empty(), causal_mask(5))
    assert hidden.shape == out.shape == (5, E)
    assert k.shape == v.shape == (5, K, D)
    logits = head.logits(out)
    assert logits.shape == (5, 16) and logits.dtype == jnp.float32
    assert head.d2t[...].dtype == jnp.int32
    assert not isinstance(head.d2t, nnx.Param)
    assert "d2t" not in nnx.to_pure_dict(nnx.state(head, nnx.Param))


def test_mask_restricts_attention():
    head = init_draft_head(tiny_head_config(), seed=1)
    hidden, embeds = _inputs(1, 3)
    rng = np.random.default_rng(2)
    ctx_k = jnp.asarray(rng.standard_normal((4, K, D)), jnp.float32)
    ctx_v = jnp.asarray(rng.standard_normal((4, K, D)), jnp.float32)
    mask = causal_mask(3, 4).at[:, 1].set(False)  # context key 1 is hidden from every query
    base, _, _ = head(hidden, embeds, jnp.arange(4, 7), ctx_k, ctx_v, mask)
    changed_k, changed_v = ctx_k.at[1].set(9.0), ctx_v.at[1].set(-9.0)
    masked, _, _ = head(hidden, embeds, jnp.arange(4, 7), changed_k, changed_v, mask)
    np.testing.assert_allclose(masked, base, atol=1e-6)
    visible, _, _ = head(hidden, embeds, jnp.arange(4, 7), ctx_k.at[2].set(9.0), ctx_v.at[2].set(-9.0), mask)
    assert np.abs(np.asarray(visible - base)).max() > 1e-3
    # A causal mask hides later tokens of the same call: the first row ignores the rest.
    first, _, _ = head(hidden[:1], embeds[:1], jnp.arange(4, 5), ctx_k, ctx_v, mask[:1, :5])
    np.testing.assert_allclose(first, base[:1], atol=1e-5)


def test_incremental_matches_single_call():
    head = init_draft_head(tiny_head_config(), seed=2)
    hidden, embeds = _inputs(3, 7)
    positions = jnp.arange(7)
    full, k_full, v_full = head(hidden, embeds, positions, _empty(), _empty(), causal_mask(7))
    first, k1, v1 = head(hidden[:4], embeds[:4], positions[:4], _empty(), _empty(), causal_mask(4))
    second, k2, _ = head(hidden[4:], embeds[4:], positions[4:], k1, v1, causal_mask(3, 4))
    np.testing.assert_allclose(jnp.concatenate([first, second]), full, atol=1e-5)
    np.testing.assert_allclose(jnp.concatenate([k1, k2]), k_full, atol=1e-5)


def _synthetic_data(num_seqs=6, length=40, top_k=3, seed=0):
    """Sequences whose 'target' always continues token x with (3x + 1) % VOCAB; data layout of train_draft."""
    rng = np.random.default_rng(seed)
    tokens, features, ids, logits, seqs = [], [], [], [], []
    for _ in range(num_seqs):
        seq = [int(rng.integers(VOCAB))]
        for _ in range(length - 1):
            seq.append((3 * seq[-1] + 1) % VOCAB)
        prompt_len, start = 5, 0
        seqs.append((len(tokens), length, prompt_len, start, len(features)))
        tokens += seq
        features += [rng.standard_normal(3 * E) for _ in seq]
        for token in seq:
            top = [(3 * token + 1) % VOCAB, (5 * token + 2) % VOCAB, (7 * token + 3) % VOCAB]
            ids.append(top[:top_k])
            logits.append([4.0, 1.0, 0.0][:top_k])
    return {"tokens": np.asarray(tokens, np.int32), "features": np.asarray(features, np.float16),
            "topk_ids": np.asarray(ids, np.int32), "topk_logits": np.asarray(logits, np.float16),
            "seqs": np.asarray(seqs, np.int64)}


def test_ttt_loss_decreases():
    train = _train_module()
    data = _synthetic_data()
    d2t, coverage = train.choose_vocab(data, 32)
    assert 0 < coverage[32] <= 1.0
    t2d = np.full(VOCAB, -1, np.int32)
    t2d[d2t] = np.arange(len(d2t))
    head = init_draft_head(tiny_head_config(draft_vocab_size=len(d2t)), seed=3)
    head.d2t[...] = jnp.asarray(d2t)
    embed = jnp.asarray(np.random.default_rng(4).standard_normal((VOCAB, E)), jnp.float32)
    graphdef, params_state, rest = nnx.split(head, nnx.Param, ...)
    params = nnx.to_pure_dict(params_state)
    tx = optax.adamw(3e-3)
    opt_state = tx.init(params)
    steps = 3
    train_step, eval_step = train.build_steps(graphdef, jax.tree.structure(params_state), rest, embed, tx, steps, 0.8)
    items = train.windows(data, 16)
    batch = {k: jnp.asarray(v) for k, v in train.make_batch(data, t2d, items[:4], 16, steps).items()}
    acc_before = np.asarray(eval_step(params, batch))
    losses = []
    for _ in range(25):
        params, opt_state, loss, per_step = train_step(params, opt_state, batch)
        losses.append(float(loss))
        assert per_step.shape == (steps,)
    assert losses[-1] < 0.5 * losses[0]
    acc_after = np.asarray(eval_step(params, batch))
    assert acc_after.shape == (steps, 2)
    assert acc_after[:, 0].sum() >= acc_before[:, 0].sum() + 10  # (correct, count) per TTT step


def test_batch_pairing():
    """Row t of a window takes the embedding of token t+1 and the target's distribution at t+1 (token t+2)."""
    train = _train_module()
    data = _synthetic_data(num_seqs=1)
    t2d = np.arange(VOCAB, dtype=np.int32)
    batch = train.make_batch(data, t2d, [(0, 0)], 8, 2)
    tokens = data["tokens"]
    np.testing.assert_array_equal(batch["next_tokens"][0, :9], tokens[1:10])
    np.testing.assert_array_equal(batch["target_top1"][0, :9], tokens[2:11])
    assert batch["label_valid"][0, :3].tolist() == [False, False, False] and batch["label_valid"][0, 3]
    np.testing.assert_array_equal(batch["positions"][0], np.arange(8))


def test_save_load_round_trip(tmp_path):
    head = init_draft_head(tiny_head_config(), seed=4)
    head.d2t[...] = jnp.arange(16, dtype=jnp.int32) * 3 + 1
    save_draft_head(tmp_path / "head", head, meta={"note": "test"})
    loaded = load_draft_head(tmp_path / "head")
    assert loaded.config == head.config
    np.testing.assert_array_equal(loaded.d2t[...], head.d2t[...])
    assert loaded.fc.kernel[...].dtype == jnp.float32
    hidden, embeds = _inputs(5, 4)
    args = (jnp.arange(4), _empty(), _empty(), causal_mask(4))
    want = head.logits(head(head.fuse(jnp.ones((4, 3 * E))), embeds, *args)[0])
    got = loaded.logits(loaded(loaded.fuse(jnp.ones((4, 3 * E))), embeds, *args)[0])
    np.testing.assert_allclose(got, want, rtol=5e-2, atol=5e-2)  # stored in bfloat16
    bf16 = load_draft_head(tmp_path / "head", dtype=jnp.bfloat16)
    assert bf16.lm_head.kernel[...].dtype == jnp.bfloat16 and bf16.d2t[...].dtype == jnp.int32
    with pytest.raises(ValueError, match="not a valid draft head"):
        load_draft_head(tmp_path)


def test_d2t_maps_draft_ids_to_target_ids():
    config = tiny_head_config(draft_vocab_size=4)
    head = init_draft_head(config)
    head.d2t[...] = jnp.asarray([2, 7, 11, 40], jnp.int32)
    np.testing.assert_array_equal(head.to_target(jnp.asarray([[3, 0], [1, 2]])), [[40, 2], [7, 11]])
    train = _train_module()
    data = _synthetic_data(num_seqs=3)
    d2t, _ = train.choose_vocab(data, 5)
    assert list(d2t) == sorted(d2t) and len(set(d2t.tolist())) == 5
    labels = np.concatenate([data["topk_ids"][f + p - 1:f + n - 1, 0] for _, n, p, _, f in data["seqs"]])
    counts = np.bincount(labels, minlength=VOCAB)
    assert counts[d2t].min() >= np.sort(counts)[-5]


def test_packaged_head():
    assert default_draft_head_path("no-such-model") is None
    path = default_draft_head_path("smollm2-135m")
    if path is None:
        pytest.skip("no packaged head (run launch/train_draft.py)")
    head = load_draft_head(path)
    assert head.config.hidden_size == 576 and head.config.feature_layers == (2, 15, 27)
    d2t = np.asarray(head.d2t[...])
    assert (np.diff(d2t) > 0).all() and d2t.max() < 49152
    assert dataclasses.replace(head.config) == head.config


@pytest.mark.skipif(not __import__("jaxinfer.layers.quant", fromlist=["quant"]).kernels_available(),
                    reason="the CPU kernels are unavailable here")
def test_quantized_drafting_copy(tmp_path):
    """Q8_0 projections (the CPU fast path): the same outputs up to the blocks' rounding, every projection
    on blocks, norms and the vocabulary map kept; only float heads are saved."""
    from jaxinfer.layers.linear import QuantLinear, QuantSpec
    from jaxinfer.spec.draft_head import quantize_draft_head

    config = tiny_head_config(hidden_size=64, head_dim=16, intermediate_size=96, draft_vocab_size=32)
    head = init_draft_head(config, seed=3)
    head.d2t[...] = jnp.arange(32, dtype=jnp.int32)[::-1]
    copy = quantize_draft_head(head, QuantSpec("q8_0", "q8_0", "int8"))
    assert all(isinstance(layer, QuantLinear) for layer in (copy.fc, copy.qkv_proj, copy.o_proj, copy.lm_head,
                                                            copy.mlp.gate_up_proj, copy.mlp.down_proj))
    np.testing.assert_array_equal(copy.d2t[...], head.d2t[...])
    rng = np.random.default_rng(4)
    hidden, embeds = (jnp.asarray(rng.standard_normal((6, 64)), jnp.float32) for _ in range(2))
    positions, mask = jnp.arange(6, dtype=jnp.int32), causal_mask(6)
    ctx = jnp.zeros((0, K, 16), jnp.float32)
    want = head.logits(head(hidden, embeds, positions, ctx, ctx, mask)[0])
    got = copy.logits(copy(hidden, embeds, positions, ctx, ctx, mask)[0])
    np.testing.assert_allclose(got, want, atol=0.05 * float(jnp.abs(want).max()))
    assert float(jnp.mean(jnp.argmax(got, -1) == jnp.argmax(want, -1))) >= 5 / 6
    assert quantize_draft_head(copy, QuantSpec()) is copy
    with pytest.raises(ValueError, match="cannot be saved"):
        save_draft_head(tmp_path / "head", copy)
