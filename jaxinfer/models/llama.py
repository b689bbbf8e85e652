"""Llama-family decoder in Flax NNX (Llama 2/3, SmolLM, Mistral without sliding window, Qwen2).

Contract: ``model(tokens[T], positions[T], kv, meta, logits_indices) -> (logits[N, V], kv)`` over the
flat tokens of one engine step (several requests; ``meta`` says which KV pages each token writes
and reads). The paged KV cache is an argument and a result, never module state.

The layers are unrolled, each with its own parameter arrays. A ``lax.scan`` over stacked layer
parameters compiles 10x faster, but XLA on CPU then copies every layer's weights out of the stack
before its matmuls (measured: ~40 ms extra per decode step of the 135M model), so the engine pays
compile time once at warm-up instead.

Parameter paths mirror Hugging Face names (``layers[i].self_attn.o_proj.kernel`` <-
``model.layers.i.self_attn.o_proj.weight``.T), except
that q/k/v and gate/up are each stored as one fused kernel (``qkv_proj``, ``gate_up_proj``): one
wide matmul instead of three or two, which decode (bandwidth-bound) runs ~12% faster on CPU.
q/k rows use the rotate-half layout of Hugging Face checkpoints. With a ``QuantSpec`` every
projection is a ``QuantLinear`` holding GGUF block rows ``qweight`` [out, in / 32 * block bytes] (the
fused parts stacked along rows), and the embedding (with the tied head) holds quantized rows too.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxinfer.config import ModelConfig
from jaxinfer.layers import quant
from jaxinfer.layers.attention import AttentionMeta, paged_attention, write_kv
from jaxinfer.layers.kv_pages import KVPages
from jaxinfer.layers.linear import Linear, QuantLinear, QuantSpec, make_linear
from jaxinfer.layers.norm import RMSNorm
from jaxinfer.layers.rotary import apply_rotary, inverse_frequencies


class LlamaAttention(nnx.Module):
    def __init__(self, config: ModelConfig, *, dtype: jnp.dtype, quant_spec: QuantSpec | None = None):
        heads_dim = config.num_heads * config.head_dim
        kv_dim = config.num_kv_heads * config.head_dim
        self.qkv_proj = make_linear(config.hidden_size, heads_dim + 2 * kv_dim, bias=config.attention_bias,
                                    dtype=dtype, quant_spec=quant_spec)
        self.o_proj = make_linear(heads_dim, config.hidden_size, dtype=dtype, quant_spec=quant_spec)
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim

    def project(self, x, positions, inv_freq):
        """x [T, E] -> q [T, H, D], k and v [T, K, D], rotary applied to q and k."""
        num_tokens = x.shape[0]
        qkv = self.qkv_proj(x)
        q_end = self.num_heads * self.head_dim
        k_end = q_end + self.num_kv_heads * self.head_dim
        q = qkv[:, :q_end].reshape(num_tokens, self.num_heads, self.head_dim)
        k = qkv[:, q_end:k_end].reshape(num_tokens, self.num_kv_heads, self.head_dim)
        v = qkv[:, k_end:].reshape(num_tokens, self.num_kv_heads, self.head_dim)
        return apply_rotary(q, positions, inv_freq), apply_rotary(k, positions, inv_freq), v

    def __call__(self, x, positions, k_pages, v_pages, inv_freq, meta, page_offset):
        num_tokens = x.shape[0]
        q, k, v = self.project(x, positions, inv_freq)
        with jax.named_scope("kv_write"):
            slots = meta.slot_mapping + page_offset * k_pages.shape[2]
            k_pages = write_kv(k_pages, k, slots)
            v_pages = write_kv(v_pages, v, slots)
        with jax.named_scope("attention"):
            out = paged_attention(q, k_pages, v_pages, meta, page_offset)
        return self.o_proj(out.reshape(num_tokens, -1).astype(x.dtype)), k_pages, v_pages


class LlamaMLP(nnx.Module):
    def __init__(self, config: ModelConfig, *, dtype: jnp.dtype, quant_spec: QuantSpec | None = None):
        self.gate_up_proj = make_linear(config.hidden_size, 2 * config.intermediate_size, dtype=dtype,
                                        quant_spec=quant_spec)
        self.down_proj = make_linear(config.intermediate_size, config.hidden_size, dtype=dtype, quant_spec=quant_spec)
        self.intermediate_size = config.intermediate_size

    def __call__(self, x):
        gate_up = self.gate_up_proj(x)
        gate, up = gate_up[..., :self.intermediate_size], gate_up[..., self.intermediate_size:]
        return self.down_proj(jax.nn.silu(gate) * up)


class LlamaDecoderLayer(nnx.Module):
    def __init__(self, config: ModelConfig, *, dtype: jnp.dtype, quant_spec: QuantSpec | None = None):
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, dtype=dtype)
        self.self_attn = LlamaAttention(config, dtype=dtype, quant_spec=quant_spec)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, dtype=dtype)
        self.mlp = LlamaMLP(config, dtype=dtype, quant_spec=quant_spec)

    def __call__(self, x, positions, k_pages, v_pages, inv_freq, meta, page_offset):
        attn_out, k_pages, v_pages = self.self_attn(self.input_layernorm(x), positions, k_pages, v_pages,
                                                    inv_freq, meta, page_offset)
        x = x + attn_out
        with jax.named_scope("mlp"):
            x = x + self.mlp(self.post_attention_layernorm(x))
        return x, k_pages, v_pages


class LlamaForCausalLM(nnx.Module):
    """``quant_spec``: weights as GGUF blocks (see jaxinfer.layers.linear.QuantSpec); then
    ``embed_tokens`` holds quantized rows [V, E / 32 * block bytes] and the head reads them too."""

    def __init__(self, config: ModelConfig, *, dtype: jnp.dtype = jnp.float32, quant_spec: QuantSpec | None = None):
        self.config = config
        self.dtype = jnp.dtype(dtype)  # float parameters, activations stored between steps (KV)
        self.quant_spec = quant_spec
        if quant_spec is None:
            self.embed_tokens = nnx.Param(jnp.zeros((config.vocab_size, config.hidden_size), dtype))  # [V, E]
        else:
            self.embed_tokens = nnx.Param(jnp.zeros(
                (config.vocab_size, quant.row_bytes(quant_spec.embed, config.hidden_size)), jnp.uint8))
        self.layers = nnx.List([LlamaDecoderLayer(config, dtype=dtype, quant_spec=quant_spec)
                                for _ in range(config.num_layers)])
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, dtype=dtype)
        if config.tie_word_embeddings:
            self.lm_head = None
        elif quant_spec is None:
            self.lm_head = Linear(config.hidden_size, config.vocab_size, dtype=dtype)
        else:
            self.lm_head = QuantLinear(config.hidden_size, config.vocab_size, qtype=quant_spec.embed,
                                       activations=quant_spec.activations, dtype=dtype)

    def embed(self, tokens: jax.Array) -> jax.Array:
        """Token ids [...] -> float32 embeddings [..., E]."""
        with jax.named_scope("embed"):
            rows = self.embed_tokens[...][tokens]
            if self.quant_spec is not None:
                return quant.dequantize(rows, self.quant_spec.embed)
            return rows.astype(jnp.float32)

    def __call__(self, tokens: jax.Array, positions: jax.Array, kv: KVPages, meta: AttentionMeta,
                 logits_indices: jax.Array, feature_layers: tuple[int, ...] = (),
                 feature_indices: jax.Array | None = None):
        """tokens, positions: [T] int32; kv: the KV pages; meta: the step's attention metadata.

        logits_indices [N] int32 picks the rows that reach the LM head (one per request that
        samples). Returns float32 logits [N, V] and the updated pages.

        With feature_layers (static) the residual stream entering each of those layers, at rows
        feature_indices [F] (default logits_indices), is returned as well: features [F, len * E]
        float32, the input of an EAGLE-3 draft head.
        """
        config = self.config
        inv_freq = inverse_frequencies(config.head_dim, config.rope_theta, config.rope_scaling)
        x = self.embed(tokens)  # [T, E]
        k_all, v_all = kv.k, kv.v
        rows = logits_indices if feature_indices is None else feature_indices
        captured = {}
        for index, layer in enumerate(self.layers):
            if index in feature_layers:
                captured[index] = x[rows]
            x, k_all, v_all = layer(x, positions, k_all, v_all, inv_freq, meta, index * kv.num_pages)
        x = self.norm(x[logits_indices])  # [N, E]
        with jax.named_scope("lm_head"):
            if self.lm_head is None and self.quant_spec is not None:
                spec = self.quant_spec
                logits = quant.qmatmul(x, self.embed_tokens[...], spec.embed, activations=spec.activations)
            elif self.lm_head is None:
                embed = self.embed_tokens[...]
                logits = jnp.einsum("ne,ve->nv", x.astype(embed.dtype), embed, preferred_element_type=jnp.float32)
            else:
                logits = self.lm_head(x).astype(jnp.float32)
        kv = KVPages(k=k_all, v=v_all, num_pages=kv.num_pages)
        if feature_layers:
            features = jnp.concatenate([captured[index] for index in feature_layers], axis=-1)
            return logits, kv, features
        return logits, kv


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
