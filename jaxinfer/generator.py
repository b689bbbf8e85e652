"""Batch generation over a contiguous KV cache: chunked prefill, then fused multi-token decode.

The jitted steps are built once per Generator and compiled ahead of time per shape bucket
(prompt chunk, batch, KV length), so compile time is measured apart from run time. The KV cache is
donated to every step. One host readback per decode chunk, not per token.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxinfer.engine.kv_cache import KVCache
from jaxinfer.layers.sampler import sample
from jaxinfer.sampling_params import SamplingParams
from jaxinfer.tokenizer import Tokenizer

MIN_KV_BUCKET = 128
MIN_PREFILL_BUCKET = 16


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SamplingArrays:
    temperature: jax.Array  # [B] float32
    top_p: jax.Array  # [B] float32
    top_k: jax.Array  # [B] int32
    key_data: jax.Array  # [B, 2] uint32, threefry key per request
    max_tokens: jax.Array  # [B] int32
    ignore_eos: jax.Array  # [B] bool

    @classmethod
    def from_params(cls, params: Sequence[SamplingParams]) -> SamplingArrays:
        return cls(
            temperature=jnp.asarray([p.temperature for p in params], jnp.float32),
            top_p=jnp.asarray([p.top_p for p in params], jnp.float32),
            top_k=jnp.asarray([p.top_k for p in params], jnp.int32),
            key_data=jnp.asarray([[p.seed >> 32, p.seed & 0xFFFFFFFF] for p in params], jnp.uint32),
            max_tokens=jnp.asarray([p.max_tokens for p in params], jnp.int32),
            ignore_eos=jnp.asarray([p.ignore_eos for p in params], jnp.bool_),
        )

    def sample(self, logits: jax.Array, index: jax.Array) -> jax.Array:
        """Sample the index[b]-th generated token of each row (the key depends on nothing else)."""
        keys = jax.vmap(jax.random.fold_in)(jax.random.wrap_key_data(self.key_data), index)
        return sample(logits, self.temperature, self.top_p, self.top_k, keys)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DecodeCarry:
    token: jax.Array  # [B] int32, last emitted token
    position: jax.Array  # [B] int32, position of ``token``
    count: jax.Array  # [B] int32, tokens generated so far
    done: jax.Array  # [B] bool


def _prefill_step(graphdef, state, kv, tokens, positions, last_index, sampling, *, kv_window):
    """One prompt chunk for every row; samples generated token 0 at each row's last index."""
    model = nnx.merge(graphdef, state)
    logits, kv = model(tokens, positions, kv, logits_indices=last_index[:, None], kv_window=kv_window)
    with jax.named_scope("sample"):
        token = sampling.sample(logits[:, 0], jnp.zeros_like(last_index))
    return token, kv


def _is_stop(token, count, sampling, eos_ids):
    eos = jnp.any(token[:, None] == eos_ids[None, :], axis=-1) & ~sampling.ignore_eos
    return eos | (count >= sampling.max_tokens)


def _decode_steps(graphdef, state, kv, carry: DecodeCarry, sampling, eos_ids, *, num_steps: int):
    """Up to ``num_steps`` decode steps in one call, stopping early once every row is done.

    Returns (tokens [B, num_steps] with -1 where a row emitted nothing, carry, kv).
    """
    model = nnx.merge(graphdef, state)
    batch = carry.token.shape[0]

    def cond(loop):
        step, carry, _, _ = loop
        return (step < num_steps) & ~jnp.all(carry.done)

    def body(loop):
        step, carry, kv, out = loop
        position = carry.position + 1
        logits, kv = model(carry.token[:, None], position[:, None], kv)
        with jax.named_scope("sample"):
            token = sampling.sample(logits[:, 0], carry.count)
        token = jnp.where(carry.done, -1, token)
        count = carry.count + (~carry.done).astype(jnp.int32)
        done = carry.done | _is_stop(token, count, sampling, eos_ids)
        out = out.at[:, step].set(token)
        carry = DecodeCarry(token=jnp.maximum(token, 0), position=position, count=count, done=done)
        return step + 1, carry, kv, out

    out = jnp.full((batch, num_steps), -1, jnp.int32)
    _, carry, kv, out = jax.lax.while_loop(cond, body, (jnp.int32(0), carry, kv, out))
    return out, carry, kv


def bucket(n: int, minimum: int) -> int:
    """Smallest power of two >= max(n, minimum)."""
    return max(minimum, 1 << max(n - 1, 0).bit_length())


@dataclasses.dataclass
class GenerationResult:
    prompt_ids: list[int]
    output_ids: list[int]
    text: str
    finish_reason: str  # "stop" (end of sequence) or "length"
    prefill_seconds: float
    decode_seconds: float


class Generator:
    """Generates continuations for a batch of token-id prompts.

    ``prefill_chunk`` bounds the tokens per prefill call. Long prompts run in chunks, each chunk
    attending only to the cache window it can see, which skips most of the causally masked work
    (measured here at 2048 tokens: 256-token chunks 329 tok/s, 512: 265, 2048: 217);
    ``decode_chunk`` is the number of decode steps fused into one device call.
    """

    def __init__(self, model: nnx.Module, tokenizer: Tokenizer, *, prefill_chunk: int = 256,
                 decode_chunk: int = 16, kv_dtype=jnp.float32):
        if prefill_chunk < MIN_PREFILL_BUCKET or prefill_chunk & (prefill_chunk - 1):
            raise ValueError(f"prefill_chunk={prefill_chunk} must be a power of two >= {MIN_PREFILL_BUCKET}")
        if decode_chunk < 1:
            raise ValueError(f"decode_chunk={decode_chunk} must be >= 1")
        self.config = model.config
        self.tokenizer = tokenizer
        self.prefill_chunk = prefill_chunk
        self.decode_chunk = decode_chunk
        self.kv_dtype = kv_dtype
        graphdef, self._state = nnx.split(model)
        self._eos_ids = jnp.asarray(tokenizer.eos_ids, jnp.int32)
        self._prefill = jax.jit(functools.partial(_prefill_step, graphdef), donate_argnames=("kv",),
                                static_argnames=("kv_window",))
        self._decode = jax.jit(functools.partial(_decode_steps, graphdef, num_steps=decode_chunk),
                               donate_argnames=("kv",))
        self._executables: dict[tuple, Callable] = {}
        self.compile_seconds = 0.0

    def _run(self, name: str, fn, *args, **static):
        """Call the executable compiled for these argument shapes, compiling it on first use."""
        key = (name, *sorted(static.items())) + tuple((x.shape, x.dtype) for x in jax.tree.leaves(args[1:]))
        executable = self._executables.get(key)
        if executable is None:
            start = time.perf_counter()
            executable = fn.lower(*args, **static).compile()
            self.compile_seconds += time.perf_counter() - start
            self._executables[key] = executable
        return executable(*args)

    def validate(self, prompt_ids: Sequence[int]) -> None:
        if len(prompt_ids) == 0:
            raise ValueError("prompt is empty")
        context = self.config.max_position
        if len(prompt_ids) >= context:
            raise ValueError(f"prompt has {len(prompt_ids)} tokens; the model's context is {context} "
                             "(one position must remain for a new token)")
        vocab = self.config.vocab_size
        bad = [t for t in prompt_ids if not 0 <= int(t) < vocab]
        if bad:
            raise ValueError(f"prompt token id {bad[0]} is outside the vocabulary [0, {vocab})")

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams | Sequence[SamplingParams],
                 *, on_tokens: Callable[[int, list[int]], None] | None = None) -> list[GenerationResult]:
        """Generate for every prompt; ``on_tokens(row, new_ids)`` streams ids as chunks complete."""
        if not prompts:
            raise ValueError("no prompts given")
        if isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(params)} sampling params")
        for prompt in prompts:
            self.validate(prompt)
        context = self.config.max_position
        # Never generate past the context: positions prompt_len .. context-1 remain.
        params = [dataclasses.replace(p, max_tokens=min(p.max_tokens, context - len(q)))
                  for p, q in zip(params, prompts, strict=True)]
        lengths = np.array([len(p) for p in prompts])
        needed = lengths + np.array([p.max_tokens for p in params])
        max_len = min(bucket(int(needed.max()), MIN_KV_BUCKET), context)
        sampling = SamplingArrays.from_params(params)
        kv = KVCache.init(self.config, len(prompts), max_len, self.kv_dtype)

        # Timings exclude compilation, which happens once per shape bucket.
        start, compiled = time.perf_counter(), self.compile_seconds
        first, kv = self._prefill_all(prompts, lengths, kv, sampling)
        first_host = np.asarray(first)
        prefill_seconds = time.perf_counter() - start - (self.compile_seconds - compiled)

        outputs = [[int(t)] for t in first_host]
        if on_tokens:
            for row, ids in enumerate(outputs):
                on_tokens(row, list(ids))
        count = np.ones(len(prompts), np.int32)
        done = np.asarray(_is_stop(first, jnp.asarray(count), sampling, self._eos_ids))
        carry = DecodeCarry(token=first, position=jnp.asarray(lengths - 1, jnp.int32),
                            count=jnp.asarray(count), done=jnp.asarray(done))
        start, compiled = time.perf_counter(), self.compile_seconds
        while not done.all():
            out, carry, kv = self._run("decode", self._decode, self._state, kv, carry, sampling, self._eos_ids)
            out_host = np.asarray(out)
            done = np.asarray(carry.done)
            for row in range(len(prompts)):
                new = [int(t) for t in out_host[row] if t >= 0]
                if new:
                    outputs[row].extend(new)
                    if on_tokens:
                        on_tokens(row, new)
        decode_seconds = time.perf_counter() - start - (self.compile_seconds - compiled)

        results = []
        for prompt, ids, p in zip(prompts, outputs, params, strict=True):
            stopped = ids[-1] in self.tokenizer.eos_ids and not p.ignore_eos
            results.append(GenerationResult(
                prompt_ids=list(map(int, prompt)), output_ids=ids,
                text=self.tokenizer.decode(ids[:-1] if stopped else ids),
                finish_reason="stop" if stopped else "length",
                prefill_seconds=prefill_seconds, decode_seconds=decode_seconds))
        return results

    def _prefill_all(self, prompts, lengths, kv, sampling):
        """Run the prompts through the model in chunks; returns generated token 0 per row."""
        longest = int(lengths.max())
        chunk = min(self.prefill_chunk, bucket(longest, MIN_PREFILL_BUCKET))
        batch = len(prompts)
        padded = np.zeros((batch, -(-longest // chunk) * chunk), np.int32)
        for row, prompt in enumerate(prompts):
            padded[row, :len(prompt)] = prompt
        first = None
        for begin in range(0, padded.shape[1], chunk):
            tokens = padded[:, begin:begin + chunk]
            # Padding tokens continue the positions: their KV lands in slots that decode overwrites
            # before any query can see them, or past the cache end where the write is dropped.
            positions = np.broadcast_to(np.arange(begin, begin + chunk, dtype=np.int32), tokens.shape)
            last_index = np.clip(lengths - 1 - begin, 0, chunk - 1).astype(np.int32)
            # Attention reads only the slots this chunk can see (rounded up to a power of two to
            # bound the number of compiled variants).
            kv_window = min(bucket(begin + chunk, chunk), kv.max_len)
            token, kv = self._run("prefill", self._prefill, self._state, kv, jnp.asarray(tokens),
                                  jnp.asarray(positions), jnp.asarray(last_index), sampling, kv_window=kv_window)
            ends_here = jnp.asarray((lengths - 1 >= begin) & (lengths - 1 < begin + chunk))
            first = token if first is None else jnp.where(ends_here, token, first)
        return first, kv
