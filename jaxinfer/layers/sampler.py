"""Token sampling on device: penalties, temperature, top-k, top-p, min-p and logprobs.

Every per-request parameter is a row of an array in `SamplingArrays`, so one compiled function serves any mix of
values; nothing here is static except shapes and the number of top logprobs. Values are validated on the host before
they get here.

Axis letters: N (rows being sampled, one per sequence), V (vocabulary).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SamplingArrays:
    """Per-row sampling parameters, one row per sequence being sampled.

    Attributes:
        temperature: [N] float32; 0 means greedy (argmax), the other fields are then ignored except penalties.
        top_p: [N] float32 in (0, 1]; nucleus sampling keeps the smallest prefix of the sorted distribution whose
            mass reaches top_p (the top token always survives); 1 = off.
        top_k: [N] int32; keep the top_k most likely tokens; 0 = off.
        min_p: [N] float32 in [0, 1]; keep tokens whose probability is at least min_p times the top probability;
            0 = off.
        repetition_penalty: [N] float32 > 0; for tokens seen in the prompt or the output, a positive logit is divided
            by it and a non-positive one multiplied by it (HF/vLLM rule); 1 = off.
        presence_penalty: [N] float32; subtracted once from the logit of every token already in the output; 0 = off.
        frequency_penalty: [N] float32; subtracted from a logit once per occurrence of its token in the output;
            0 = off.
        key_data: [N, 2] uint32; raw threefry2x32 key data of the request's seed, [seed >> 32, seed & 0xFFFFFFFF]
            (see `key_data_from_seed`).
        index: [N] int32; which generated token of the request this is (0, 1, 2, ...), folded into the key.
    """

    temperature: jax.Array
    top_p: jax.Array
    top_k: jax.Array
    min_p: jax.Array
    repetition_penalty: jax.Array
    presence_penalty: jax.Array
    frequency_penalty: jax.Array
    key_data: jax.Array
    index: jax.Array


def key_data_from_seed(seed: int) -> np.ndarray:
    """Host-side: the [2] uint32 key data of a 64-bit seed, [hi, lo], equal to `jax.random.key(seed)`'s data."""
    seed &= (1 << 64) - 1
    return np.array([seed >> 32, seed & 0xFFFFFFFF], dtype=np.uint32)


def apply_penalties(logits: jax.Array, output_counts: jax.Array, prompt_mask: jax.Array,
                    arrays: SamplingArrays) -> jax.Array:
    """Apply repetition, presence and frequency penalties.

    Args:
        logits: [N, V] float32.
        output_counts: [N, V] int32, how many times each token occurs in the row's generated output so far.
        prompt_mask: [N, V] bool, whether each token occurs in the row's prompt.
        arrays: the per-row parameters ([N] each).

    Returns:
        [N, V] float32. The repetition penalty goes first (on prompt and output tokens, as vLLM does), then
        frequency and presence (on output tokens only, as OpenAI does). Rows whose penalties are all off come back
        bit-identical, and the whole computation is skipped when no row uses any penalty.
    """
    rep = arrays.repetition_penalty[:, None]
    presence = arrays.presence_penalty[:, None]
    frequency = arrays.frequency_penalty[:, None]

    def penalize(logits: jax.Array) -> jax.Array:
        in_output = output_counts > 0
        repeated = jnp.where(logits > 0, logits / rep, logits * rep)
        logits = jnp.where(prompt_mask | in_output, repeated, logits)
        logits = logits - frequency * output_counts.astype(logits.dtype)
        return logits - presence * in_output.astype(logits.dtype)

    used = (arrays.repetition_penalty != 1) | (arrays.presence_penalty != 0) | (arrays.frequency_penalty != 0)
    with jax.named_scope("penalties"):
        return jax.lax.cond(jnp.any(used), penalize, lambda logits: logits, logits)


def _row_keys(arrays: SamplingArrays) -> jax.Array:
    """[N] typed keys: the request's seed with the token index folded in, so a row's draw depends on nothing else."""
    fold = lambda data, index: jax.random.fold_in(jax.random.wrap_key_data(data, impl="threefry2x32"), index)
    return jax.vmap(fold)(arrays.key_data, arrays.index)


def _truncation_cutoff(scaled: jax.Array, arrays: SamplingArrays) -> jax.Array:
    """[N] float32: the smallest temperature-scaled logit a row keeps under its top-k, top-p and min-p.

    Each rule keeps a prefix of the row sorted in descending order, so together they keep the shortest of the three
    prefixes, found with one sort. Tokens tied with the last kept one are kept too. A rule that is off keeps the whole
    row exactly (never subject to rounding in the cumulative sum), so a row's result does not depend on whether other
    rows in the batch made this function run.
    """
    sorted_logits = jnp.sort(scaled, axis=-1, descending=True)  # [N, V]
    ranks = jnp.arange(scaled.shape[-1])[None, :]
    top_k = arrays.top_k[:, None]
    keep = (top_k <= 0) | (ranks < top_k)
    # Unnormalized probabilities relative to the top token: exp(0) = 1 at rank 0.
    relative = jnp.exp(sorted_logits - sorted_logits[:, :1])
    # Top-p applies to the distribution renormalized after top-k, as HF and vLLM do.
    in_top_k = jnp.where(keep, relative, 0.0)
    mass_before = jnp.cumsum(in_top_k, axis=-1) - in_top_k  # exactly 0 at rank 0: the top token always survives
    total = jnp.sum(in_top_k, axis=-1, keepdims=True)
    top_p = arrays.top_p[:, None]
    keep &= (top_p >= 1) | (mass_before < top_p * total)
    # Min-p compares with the top probability, a ratio that no renormalization changes; exp(0) = 1 >= min_p keeps
    # the top token, and relative >= 0 keeps everything when min_p is 0.
    keep &= relative >= arrays.min_p[:, None]
    num_keep = jnp.sum(keep, axis=-1)  # >= 1; keep is a prefix since every rule is monotone in the rank
    return jnp.take_along_axis(sorted_logits, (num_keep - 1)[:, None], axis=-1)[:, 0]


def sample(logits: jax.Array, arrays: SamplingArrays) -> jax.Array:
    """Pick one token per row.

    Greedy rows (temperature 0) take the argmax. Stochastic rows divide the logits by their temperature, keep the
    tokens allowed by top-k, then top-p, then min-p (all on the temperature-scaled distribution) and draw from what
    is left with the key `fold_in(wrap_key_data(key_data[n]), index[n])`. A row's token depends only on its own
    logits, parameters, seed and index: never on the other rows or the batch size.

    The sort is skipped when every row is greedy or no stochastic row truncates its distribution.

    Args:
        logits: [N, V] float32, already penalized (`apply_penalties`).
        arrays: the per-row parameters ([N] each).

    Returns:
        [N] int32 token ids.
    """
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    stochastic = arrays.temperature > 0

    def draw(logits: jax.Array) -> jax.Array:
        scaled = logits / jnp.where(stochastic, arrays.temperature, 1.0)[:, None]
        truncates = stochastic & ((arrays.top_k > 0) | (arrays.top_p < 1) | (arrays.min_p > 0))
        no_cutoff = jnp.full(scaled.shape[:1], -jnp.inf, scaled.dtype)
        cutoff = jax.lax.cond(jnp.any(truncates), _truncation_cutoff, lambda *_: no_cutoff, scaled, arrays)
        masked = jnp.where(scaled >= cutoff[:, None], scaled, -jnp.inf)
        tokens = jax.vmap(jax.random.categorical)(_row_keys(arrays), masked).astype(jnp.int32)
        return jnp.where(stochastic, tokens, greedy)

    with jax.named_scope("sampling"):
        return jax.lax.cond(jnp.any(stochastic), draw, lambda _: greedy, logits)


def logprobs(logits: jax.Array, tokens: jax.Array, num_top: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Log-probabilities of the chosen tokens and of each row's most likely tokens.

    These are the log-softmax of the given logits: the model's distribution after penalties, before temperature,
    top-k, top-p and min-p.

    Args:
        logits: [N, V] float32, penalized as they were for sampling.
        tokens: [N] int32, the tokens chosen.
        num_top: static number of most likely tokens to report per row (0 gives empty arrays).

    Returns:
        token_logprob [N] float32, top_ids [N, num_top] int32 (most likely first) and top_logprobs [N, num_top]
        float32.
    """
    with jax.named_scope("logprobs"):
        log_norm = jax.nn.logsumexp(logits, axis=-1, keepdims=True)  # [N, 1]
        token_logit = jnp.take_along_axis(logits, tokens[:, None].astype(jnp.int32), axis=-1)
        # Rank the raw logits: subtracting the normalizer first could round two close logits into a tie.
        top_logits, top_ids = jax.lax.top_k(logits, num_top)
        return (token_logit - log_norm)[:, 0], top_ids.astype(jnp.int32), top_logits - log_norm
