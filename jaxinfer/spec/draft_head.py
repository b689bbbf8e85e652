"""EAGLE-3 draft head: one decoder layer over fused target features, with a reduced vocabulary.

Data flow of one draft step (axis letters as in ``jaxinfer.models``; Vd is the draft vocabulary):

    features [T, 3E] --fuse--> g [T, E]                          (target states entering 3 layers)
    hidden [T, E] (g at the first step, the head's own out_hidden after it)
    x = concat(RMSNorm(embeds), RMSNorm(hidden))  [T, 2E]       (embeds: the TARGET's embeddings)
    q, k, v = qkv_proj(x); rotary (rotate-half, target convention)
    h = hidden + o_proj(attention(q, ctx + own k/v, mask))
    out_hidden = h + mlp(RMSNorm(h))                             (pre-final-norm: what is fed back)
    logits = lm_head(norm(out_hidden))  [T, Vd]   ->  target id = d2t[draft id]

Pairing (EAGLE convention): the input at RoPE position t is (feature of token t, embedding of
token t+1) and predicts token t+2. The token embedding table is the target's, frozen, and never a
part of this module: callers gather ``embeds`` themselves.

Parameters are created zero-filled like every jaxinfer layer; ``init_draft_head`` gives random
ones for training, ``load_draft_head`` trained ones.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxinfer.config import ModelConfig, RopeScaling
from jaxinfer.layers import quant
from jaxinfer.layers.linear import QuantSpec, make_linear
from jaxinfer.layers.norm import RMSNorm
from jaxinfer.layers.rotary import apply_rotary, inverse_frequencies
from jaxinfer.models.llama import LlamaMLP

MARKER = "draft_head.json"
FORMAT = "jaxinfer-eagle3-v1"
HEADS_DIR = Path(__file__).parent / "heads"
_MASK_VALUE = -1e30  # finite, so a query row with every key masked (padding) yields no NaN


@dataclass(frozen=True, slots=True)
class DraftHeadConfig:
    """Architecture of an EAGLE-3 draft head; the attention shape and rotary follow its target."""

    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    draft_vocab_size: int
    feature_layers: tuple[int, int, int]  # target layers whose input residual stream is fused
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: RopeScaling | None = None

    def __post_init__(self) -> None:
        for name in ("hidden_size", "num_heads", "num_kv_heads", "head_dim", "intermediate_size",
                     "draft_vocab_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"draft head {name}={value!r} must be a positive integer")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for rotary embeddings")
        if len(self.feature_layers) != 3 or any(not isinstance(i, int) or i < 0 for i in self.feature_layers):
            raise ValueError(f"feature_layers must be 3 layer indices, got {self.feature_layers!r}")

    @classmethod
    def from_target(cls, target: ModelConfig, draft_vocab_size: int) -> DraftHeadConfig:
        """EAGLE-3 sizes: the target's attention and MLP shapes; fused layers (2, L//2, L-3)."""
        num_layers = target.num_layers
        if num_layers < 4:
            raise ValueError(f"an EAGLE-3 head needs a target of at least 4 layers, got {num_layers}")
        if not 0 < draft_vocab_size <= target.vocab_size:
            raise ValueError(f"draft_vocab_size={draft_vocab_size} must be in [1, {target.vocab_size}]")
        return cls(hidden_size=target.hidden_size, num_heads=target.num_heads, num_kv_heads=target.num_kv_heads,
                   head_dim=target.head_dim, intermediate_size=target.intermediate_size,
                   draft_vocab_size=draft_vocab_size, feature_layers=(2, num_layers // 2, num_layers - 3),
                   rms_norm_eps=target.rms_norm_eps, rope_theta=target.rope_theta, rope_scaling=target.rope_scaling)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["feature_layers"] = list(self.feature_layers)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DraftHeadConfig:
        fields = dict(data)
        fields["feature_layers"] = tuple(fields["feature_layers"])
        if fields.get("rope_scaling") is not None:
            fields["rope_scaling"] = RopeScaling(**fields["rope_scaling"])
        return cls(**fields)


class DraftVocab(nnx.Variable):
    """Constant int32 [Vd]: the target token id of each draft id. A Variable but not a Param, so
    optimizers built with ``wrt=nnx.Param`` leave it alone."""


class EagleDraftHead(nnx.Module):
    """``quant_spec``: the projections as GGUF blocks run by the CPU kernels (``quantize_draft_head``: a
    drafting copy for the CPU fast path; training keeps float weights)."""

    def __init__(self, config: DraftHeadConfig, *, dtype: jnp.dtype = jnp.float32, quant_spec: QuantSpec | None = None):
        hidden, eps = config.hidden_size, config.rms_norm_eps
        qkv_dim = (config.num_heads + 2 * config.num_kv_heads) * config.head_dim
        linear = functools.partial(make_linear, dtype=dtype, quant_spec=quant_spec)
        self.config = config
        self.quant_spec = quant_spec
        self.fc = linear(3 * hidden, hidden)
        self.embed_norm = RMSNorm(hidden, eps=eps, dtype=dtype)
        self.hidden_norm = RMSNorm(hidden, eps=eps, dtype=dtype)
        self.qkv_proj = linear(2 * hidden, qkv_dim)
        self.o_proj = linear(config.num_heads * config.head_dim, hidden)
        self.post_attention_layernorm = RMSNorm(hidden, eps=eps, dtype=dtype)
        self.mlp = LlamaMLP(config, dtype=dtype, quant_spec=quant_spec)  # reads only hidden and intermediate sizes
        self.norm = RMSNorm(hidden, eps=eps, dtype=dtype)
        self.lm_head = linear(hidden, config.draft_vocab_size)
        self.d2t = DraftVocab(jnp.arange(config.draft_vocab_size, dtype=jnp.int32))

    def fuse(self, features: jax.Array) -> jax.Array:
        """features [T, 3E] (target residual streams, concatenated) -> g [T, E] float32."""
        return self.fc(features)

    def __call__(self, hidden: jax.Array, embeds: jax.Array, positions: jax.Array, ctx_k: jax.Array,
                 ctx_v: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """One draft step over T query tokens.

        hidden [T, E]: ``fuse(features)`` or a previous step's out_hidden; embeds [T, E]: target
        embeddings of the next tokens; positions [T] int32 RoPE positions; ctx_k, ctx_v [S, K, D]:
        keys/values of earlier calls (S may be 0); mask [T, S + T] bool: which of the keys
        concat(ctx, this call's own) each query sees. The caller builds causal or tree masks.

        Returns out_hidden [T, E] float32, pre-final-norm (EAGLE-3 feeds this back as ``hidden``;
        ``logits`` applies the norm), and this call's k [T, K, D] (rotary applied) and v [T, K, D],
        float32, to append to the context of later calls.
        """
        cfg = self.config
        num_tokens = hidden.shape[0]
        group = cfg.num_heads // cfg.num_kv_heads
        q, k, v = self.project(hidden, embeds, positions)
        keys = jnp.concatenate([ctx_k.astype(jnp.float32), k], axis=0)  # [S + T, K, D]
        values = jnp.concatenate([ctx_v.astype(jnp.float32), v], axis=0)
        with jax.named_scope("attention"):
            q = q.reshape(num_tokens, cfg.num_kv_heads, group, cfg.head_dim)  # [T, K, G, D]
            scores = jnp.einsum("tkgd,skd->kgts", q, keys) * cfg.head_dim ** -0.5
            scores = jnp.where(mask[None, None], scores, _MASK_VALUE)
            probs = jax.nn.softmax(scores, axis=-1)
            attn = jnp.einsum("kgts,skd->tkgd", probs, values).reshape(num_tokens, -1)
        h = hidden.astype(jnp.float32) + self.o_proj(attn)
        with jax.named_scope("mlp"):
            h = h + self.mlp(self.post_attention_layernorm(h))
        return h, k, v

    def project(self, hidden: jax.Array, embeds: jax.Array, positions: jax.Array):
        """q [T, H, D], k and v [T, K, D] (float32, rotary applied) of a draft step's inputs. The K/V of
        a pair depend only on it, so the engine writes draft KV without running attention."""
        cfg = self.config
        num_tokens = hidden.shape[0]
        x = jnp.concatenate([self.embed_norm(embeds), self.hidden_norm(hidden)], axis=-1)  # [T, 2E]
        qkv = self.qkv_proj(x).astype(jnp.float32)
        q_end = cfg.num_heads * cfg.head_dim
        k_end = q_end + cfg.num_kv_heads * cfg.head_dim
        inv_freq = inverse_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
        q = apply_rotary(qkv[:, :q_end].reshape(num_tokens, cfg.num_heads, cfg.head_dim), positions, inv_freq)
        k = apply_rotary(qkv[:, q_end:k_end].reshape(num_tokens, cfg.num_kv_heads, cfg.head_dim), positions,
                         inv_freq)
        return q, k, qkv[:, k_end:].reshape(num_tokens, cfg.num_kv_heads, cfg.head_dim)

    def logits(self, out_hidden: jax.Array) -> jax.Array:
        """out_hidden [T, E] -> float32 logits [T, Vd] over the draft vocabulary."""
        return self.lm_head(self.norm(out_hidden))

    def to_target(self, draft_ids: jax.Array) -> jax.Array:
        """Draft-vocabulary ids (any shape) -> target token ids."""
        return self.d2t[...][draft_ids]


def quantize_draft_head(head: EagleDraftHead, quant_spec: QuantSpec) -> EagleDraftHead:
    """A drafting copy of a float head whose projections are ``quant_spec.linear`` blocks: on the CPU fast
    path each draft level then streams a quarter of the float32 weights (drafting is weight-bound at a
    few rows). Norms and the vocabulary map are kept; the drafts change a little, never the output
    (verification decides every token)."""
    if head.quant_spec is not None:
        return head
    float_values = _flat_state(head)
    shell = nnx.eval_shape(lambda: EagleDraftHead(head.config, quant_spec=quant_spec))
    graphdef, state = nnx.split(shell)
    flat = []
    for path, leaf in nnx.to_flat_state(state):
        name = ".".join(map(str, path))
        if path[-1] == "qweight":
            kernel = np.asarray(float_values[".".join(map(str, (*path[:-1], "kernel")))], np.float32)
            value = jnp.asarray(quant.quantize(kernel.T, quant_spec.linear))  # [out, in] rows of blocks
        else:
            value = jnp.asarray(float_values[name], leaf.dtype)
        flat.append((path, leaf.replace(value)))
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def causal_mask(num_tokens: int, num_ctx: int = 0) -> jax.Array:
    """[T, S + T] bool: every query sees the whole context and the own tokens up to itself."""
    own = jnp.tril(jnp.ones((num_tokens, num_tokens), bool))
    return jnp.concatenate([jnp.ones((num_tokens, num_ctx), bool), own], axis=1)


def init_draft_head(config: DraftHeadConfig, seed: int = 0, dtype=jnp.float32) -> EagleDraftHead:
    """A head with random weights: kernels normal(0, 1/sqrt(fan_in)), norms 1, d2t the identity."""
    head = EagleDraftHead(config, dtype=dtype)
    key = jax.random.key(seed)
    for path, variable in nnx.iter_graph(head):
        if isinstance(variable, nnx.Param) and path[-1] == "kernel":
            key, sub = jax.random.split(key)
            fan_in = variable.shape[0]
            variable[...] = (jax.random.normal(sub, variable.shape, jnp.float32) / np.sqrt(fan_in)).astype(dtype)
    return head


def _flat_state(head: EagleDraftHead) -> dict[str, jax.Array]:
    _, state = nnx.split(head)
    return {".".join(map(str, path)): leaf[...] for path, leaf in nnx.to_flat_state(state)}


def save_draft_head(directory: str | Path, head: EagleDraftHead, *, dtype=jnp.bfloat16,
                    meta: Mapping[str, Any] | None = None) -> None:
    """Write ``DIR/draft_head.json`` (format, config, extra ``meta``) and ``DIR/params`` (orbax;
    float parameters cast to ``dtype``, d2t kept int32). Replaces an existing head directory."""
    import orbax.checkpoint as ocp

    if head.quant_spec is not None:
        raise ValueError("a quantized drafting copy cannot be saved: save the float head it was made from")
    directory = Path(directory).absolute()
    if directory.exists():
        if not (directory / MARKER).is_file() and any(directory.iterdir()):
            raise ValueError(f"{directory} exists and is not a draft head directory; refusing to overwrite")
        shutil.rmtree(directory)
    directory.mkdir(parents=True)
    values = {name: value if name == "d2t" else value.astype(dtype) for name, value in _flat_state(head).items()}
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(directory / "params", values)
    checkpointer.wait_until_finished()
    info = {"format": FORMAT, "config": head.config.to_dict(), "dtype": jnp.dtype(dtype).name, **(meta or {})}
    (directory / MARKER).write_text(json.dumps(info, indent=1))


def load_draft_head(path: str | Path, dtype=jnp.float32) -> EagleDraftHead:
    """Load a head written by ``save_draft_head``; float parameters are cast to ``dtype``."""
    import orbax.checkpoint as ocp

    path = Path(path).absolute()
    try:
        info = json.loads((path / MARKER).read_text())
        if info.get("format") != FORMAT:
            raise ValueError(f"unknown draft head format {info.get('format')!r}")
        config = DraftHeadConfig.from_dict(info["config"])
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ValueError(f"{path} is not a valid draft head directory: {exc}") from None
    stored = jnp.dtype(info.get("dtype", "float32"))
    head = nnx.eval_shape(lambda: EagleDraftHead(config, dtype=stored))
    graphdef, state = nnx.split(head)
    target = {".".join(map(str, p)): jax.ShapeDtypeStruct(leaf.shape, leaf.dtype)
              for p, leaf in nnx.to_flat_state(state)}
    restored = ocp.StandardCheckpointer().restore(path / "params", target)
    flat = [(p, leaf.replace(jnp.asarray(restored[".".join(map(str, p))],
                                         jnp.int32 if p == ("d2t",) else dtype)))
            for p, leaf in nnx.to_flat_state(state)]
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def default_draft_head_path(model_name: str) -> Path | None:
    """The head shipped in the package for an embedded model name, or None."""
    path = HEADS_DIR / model_name
    return path if (path / MARKER).is_file() else None


CALIBRATION = "calibration.json"


def prepare_speculative(config, model_name: str):
    """(config, draft head or None) for an engine: loads the draft head the method needs (``config.draft``,
    else the head shipped for ``model_name``); takes the depth and verify budget left unset (0) from
    the policy ``launch/calibrate_spec.py`` tuned for it (its calibration), and for heterospec without
    explicit thresholds the bin edges stored there. Raises ValueError naming what is missing."""
    if not config.uses_draft_head:
        return config.with_policy(), None
    path = Path(config.draft) if config.draft else default_draft_head_path(model_name)
    if path is None:
        raise ValueError(f"no draft head is shipped for model {model_name!r}: train one with launch/train_draft.py "
                         "and pass its directory as the draft (--draft), or use --speculative ngram")
    head = load_draft_head(path)
    calibration = Path(path) / CALIBRATION
    info = json.loads(calibration.read_text()) if calibration.is_file() else {}
    tuned = info.get("policy", {})
    if tuned and config.top_k == tuned.get("top_k"):
        config = config.with_policy(tuned.get("depth", 0), tuned.get("nodes", 0))
    config = config.with_policy()
    if config.method == "heterospec" and not config.thresholds:
        if not info:
            raise ValueError(f"draft head {path} has no {CALIBRATION}: run launch/calibrate_spec.py --draft {path}, "
                             "or set the thresholds")
        if (tuned.get("depth"), tuned.get("top_k")) != (config.depth, config.top_k):
            raise ValueError(f"{calibration} was fitted for depth {tuned.get('depth')} and top-k "
                             f"{tuned.get('top_k')}, not {config.depth} and {config.top_k}: the path entropy "
                             "scale differs; recalibrate (launch/calibrate_spec.py) or set the thresholds")
        config = dataclasses.replace(config, thresholds=tuple(float(t) for t in info["thresholds"]))
    return config, head
