"""Llama-family decoder in Flax NNX (Llama 2/3, SmolLM, Mistral without sliding window, Qwen2).

Contract: ``model(tokens[B, T], positions[B, T], kv, logits_indices=None) -> (logits, kv)``.
The KV cache is an argument and a result, never module state. Parameter paths mirror Hugging Face
names (``layers[i].self_attn.o_proj.kernel`` <- ``model.layers.i.self_attn.o_proj.weight``.T), except
that q/k/v and gate/up are each stored as one fused kernel (``qkv_proj``, ``gate_up_proj``): one
wide matmul instead of three or two, which decode (bandwidth-bound) runs ~12% faster on CPU.
q/k rows use the rotate-half layout of Hugging Face checkpoints.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxinfer.config import ModelConfig
from jaxinfer.engine.kv_cache import KVCache
from jaxinfer.layers.attention import attention, write_kv
from jaxinfer.layers.linear import Linear
from jaxinfer.layers.norm import RMSNorm
from jaxinfer.layers.rotary import apply_rotary, inverse_frequencies


class LlamaAttention(nnx.Module):
    def __init__(self, config: ModelConfig, *, dtype: jnp.dtype):
        heads_dim = config.num_heads * config.head_dim
        kv_dim = config.num_kv_heads * config.head_dim
        self.qkv_proj = Linear(config.hidden_size, heads_dim + 2 * kv_dim, bias=config.attention_bias, dtype=dtype)
        self.o_proj = Linear(heads_dim, config.hidden_size, dtype=dtype)
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim

    def __call__(self, x, positions, k_cache, v_cache, inv_freq, kv_window):
        batch, num_tokens, _ = x.shape
        qkv = self.qkv_proj(x)
        q_end = self.num_heads * self.head_dim
        k_end = q_end + self.num_kv_heads * self.head_dim
        q = qkv[..., :q_end].reshape(batch, num_tokens, self.num_heads, self.head_dim)  # [B, T, H, D]
        k = qkv[..., q_end:k_end].reshape(batch, num_tokens, self.num_kv_heads, self.head_dim)  # [B, T, K, D]
        v = qkv[..., k_end:].reshape(batch, num_tokens, self.num_kv_heads, self.head_dim)
        q = apply_rotary(q, positions, inv_freq)
        k = apply_rotary(k, positions, inv_freq)
        with jax.named_scope("kv_write"):
            k_cache = write_kv(k_cache, k, positions)
            v_cache = write_kv(v_cache, v, positions)
        with jax.named_scope("attention"):
            out = attention(q, k_cache, v_cache, positions, kv_window)
        return self.o_proj(out.reshape(batch, num_tokens, -1)), k_cache, v_cache


class LlamaMLP(nnx.Module):
    def __init__(self, config: ModelConfig, *, dtype: jnp.dtype):
        self.gate_up_proj = Linear(config.hidden_size, 2 * config.intermediate_size, dtype=dtype)
        self.down_proj = Linear(config.intermediate_size, config.hidden_size, dtype=dtype)
        self.intermediate_size = config.intermediate_size

    def __call__(self, x):
        gate_up = self.gate_up_proj(x)
        gate, up = gate_up[..., :self.intermediate_size], gate_up[..., self.intermediate_size:]
        return self.down_proj(jax.nn.silu(gate) * up)


class LlamaDecoderLayer(nnx.Module):
    def __init__(self, config: ModelConfig, *, dtype: jnp.dtype):
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, dtype=dtype)
        self.self_attn = LlamaAttention(config, dtype=dtype)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, dtype=dtype)
        self.mlp = LlamaMLP(config, dtype=dtype)

    def __call__(self, x, positions, k_cache, v_cache, inv_freq, kv_window):
        attn_out, k_cache, v_cache = self.self_attn(self.input_layernorm(x), positions, k_cache,
                                                    v_cache, inv_freq, kv_window)
        x = x + attn_out
        with jax.named_scope("mlp"):
            x = x + self.mlp(self.post_attention_layernorm(x))
        return x, k_cache, v_cache


class LlamaForCausalLM(nnx.Module):
    def __init__(self, config: ModelConfig, *, dtype: jnp.dtype = jnp.float32):
        self.config = config
        self.embed_tokens = nnx.Param(jnp.zeros((config.vocab_size, config.hidden_size), dtype))  # [V, E]
        self.layers = nnx.List([LlamaDecoderLayer(config, dtype=dtype) for _ in range(config.num_layers)])
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, dtype=dtype)
        self.lm_head = (None if config.tie_word_embeddings
                        else Linear(config.hidden_size, config.vocab_size, dtype=dtype))

    def __call__(self, tokens: jax.Array, positions: jax.Array, kv: KVCache,
                 logits_indices: jax.Array | None = None, kv_window: int | None = None,
                 ) -> tuple[jax.Array, KVCache]:
        """tokens, positions: [B, T] int32; kv: cache with S >= every real position.

        kv_window: optional static bound on every real position; attention then reads only the
        first kv_window cache slots.

        logits_indices: optional [B, N] indices into T; when given only those rows reach the LM
        head (a prefill needs the last prompt token only). Returns float32 logits [B, T or N, V].
        """
        config = self.config
        inv_freq = inverse_frequencies(config.head_dim, config.rope_theta, config.rope_scaling)
        x = self.embed_tokens[...][tokens].astype(jnp.float32)  # [B, T, E]
        new_k, new_v = [], []
        for layer, k_cache, v_cache in zip(self.layers, kv.k, kv.v, strict=True):
            x, k_cache, v_cache = layer(x, positions, k_cache, v_cache, inv_freq, kv_window)
            new_k.append(k_cache)
            new_v.append(v_cache)
        if logits_indices is not None:
            x = jnp.take_along_axis(x, logits_indices[:, :, None], axis=1)  # [B, N, E]
        x = self.norm(x)
        with jax.named_scope("lm_head"):
            if self.lm_head is None:
                embed = self.embed_tokens[...]
                logits = jnp.einsum("bte,ve->btv", x.astype(embed.dtype), embed,
                                    preferred_element_type=jnp.float32)
            else:
                logits = self.lm_head(x)
        return logits, KVCache(k=tuple(new_k), v=tuple(new_v))


def param_path(hf_name: str) -> tuple[tuple[str | int, ...], bool, int | None]:
    """Map a Hugging Face tensor name to (path in the NNX state, transpose?, part of a fused param).

    ``model.layers.3.mlp.up_proj.weight`` -> (("layers", 3, "mlp", "gate_up_proj", "kernel"), True, 1):
    part 1 of the fused kernel, whose parts are concatenated along the last axis in part order.
    """
    parts: list[str | int] = [int(p) if p.isdigit() else p for p in hf_name.split(".")]
    if parts[0] == "model":
        parts = parts[1:]
    if parts == ["embed_tokens", "weight"]:
        return ("embed_tokens",), False, None
    if len(parts) < 2 or parts[-2] not in _LINEARS:
        return tuple(parts), False, None
    module, part = _FUSED.get(parts[-2], (parts[-2], None))
    leaf = "kernel" if parts[-1] == "weight" else parts[-1]
    return tuple(parts[:-2]) + (module, leaf), leaf == "kernel", part


_FUSED = {"q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
          "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}
_LINEARS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"}
