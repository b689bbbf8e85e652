"""An independent float64 numpy Llama forward pass over Hugging Face named tensors (test oracle).

Written from the architecture's definition, sharing no code with jaxinfer: rotate-half RoPE with
optional Llama-3 frequency scaling, GQA, SwiGLU, RMSNorm, tied or untied head, optional q/k/v bias.
"""

import math

import numpy as np


def llama3_inv_freq(head_dim, theta, factor=None, low=None, high=None, original=None):
    freqs = []
    for i in range(0, head_dim, 2):
        f = theta ** (-i / head_dim)
        if factor is not None:
            wavelen = 2 * math.pi / f
            if wavelen < original / high:
                pass
            elif wavelen > original / low:
                f = f / factor
            else:
                smooth = (original / wavelen - low) / (high - low)
                f = (1 - smooth) * f / factor + smooth * f
        freqs.append(f)
    return np.array(freqs)


def _rms(x, w, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def _rope(x, pos, inv_freq):  # x [T, N, D]
    ang = pos[:, None] * inv_freq[None, :]  # [T, D/2]
    cos, sin = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
    half = x.shape[-1] // 2
    a, b = x[..., :half], x[..., half:]
    return np.concatenate([a * cos - b * sin, b * cos + a * sin], axis=-1)


def forward(tensors, cfg, tokens, rope_scaling=None):
    """Logits [T, V] (float64) for one sequence ``tokens`` at positions 0..T-1."""
    t = {k: np.asarray(v, np.float64) for k, v in tensors.items()}
    n, kvh, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    scaling = {} if rope_scaling is None else rope_scaling
    inv = llama3_inv_freq(d, cfg.rope_theta, **scaling)
    pos = np.arange(len(tokens), dtype=np.float64)
    x = t["model.embed_tokens.weight"][np.asarray(tokens)]
    T = len(tokens)
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        h = _rms(x, t[p + "input_layernorm.weight"], cfg.rms_norm_eps)

        def proj(name, h=h, p=p):
            y = h @ t[p + f"self_attn.{name}.weight"].T
            return y + t[p + f"self_attn.{name}.bias"] if p + f"self_attn.{name}.bias" in t else y

        q = _rope(proj("q_proj").reshape(T, n, d), pos, inv)
        k = _rope(proj("k_proj").reshape(T, kvh, d), pos, inv)
        v = proj("v_proj").reshape(T, kvh, d)
        out = np.zeros((T, n, d))
        for head in range(n):
            kv = head // (n // kvh)
            s = q[:, head] @ k[:, kv].T / math.sqrt(d)
            s = np.where(np.tril(np.ones((T, T), bool)), s, -np.inf)
            s = np.exp(s - s.max(-1, keepdims=True))
            out[:, head] = (s / s.sum(-1, keepdims=True)) @ v[:, kv]
        x = x + out.reshape(T, n * d) @ t[p + "self_attn.o_proj.weight"].T
        h = _rms(x, t[p + "post_attention_layernorm.weight"], cfg.rms_norm_eps)
        gate = h @ t[p + "mlp.gate_proj.weight"].T
        up = h @ t[p + "mlp.up_proj.weight"].T
        x = x + (gate / (1 + np.exp(-gate)) * up) @ t[p + "mlp.down_proj.weight"].T
    x = _rms(x, t["model.norm.weight"], cfg.rms_norm_eps)
    head = t.get("lm_head.weight", t["model.embed_tokens.weight"])
    return x @ head.T


def random_tensors(cfg, seed=0):
    """Random HF-named float32 tensors for ``cfg`` ([out, in] linear weights)."""
    rng = np.random.default_rng(seed)
    e, f, n, kvh, d = cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim

    def w(out, inp):
        return (rng.standard_normal((out, inp)) / math.sqrt(inp)).astype(np.float32)

    t = {"model.embed_tokens.weight": rng.standard_normal((cfg.vocab_size, e)).astype(np.float32),
         "model.norm.weight": (1 + 0.1 * rng.standard_normal(e)).astype(np.float32)}
    if not cfg.tie_word_embeddings:
        t["lm_head.weight"] = w(cfg.vocab_size, e)
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        t[p + "input_layernorm.weight"] = (1 + 0.1 * rng.standard_normal(e)).astype(np.float32)
        t[p + "post_attention_layernorm.weight"] = (1 + 0.1 * rng.standard_normal(e)).astype(np.float32)
        for name, out in (("q_proj", n * d), ("k_proj", kvh * d), ("v_proj", kvh * d)):
            t[p + f"self_attn.{name}.weight"] = w(out, e)
            if cfg.attention_bias:
                t[p + f"self_attn.{name}.bias"] = (0.1 * rng.standard_normal(out)).astype(np.float32)
        t[p + "self_attn.o_proj.weight"] = w(e, n * d)
        t[p + "mlp.gate_proj.weight"] = w(f, e)
        t[p + "mlp.up_proj.weight"] = w(f, e)
        t[p + "mlp.down_proj.weight"] = w(e, f)
    return t
