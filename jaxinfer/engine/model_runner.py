"""The one owner of a replica's device state: weights, KV pages, penalty state, compiled steps.

Everything the runner will run is listed in its compile plan (``plan``: every bucketed step shape,
their samplers, the programs spec/ hands down, migration transfers) and compiled ahead of time at
warm-up; after that a step never compiles (``num_compiles`` stays at ``len(plan)``, which the
compile-budget test checks). The KV pages and the sampler state are donated to every step and
rebound to its results at once.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import logging
import threading
import time
from collections.abc import Callable, Hashable, Iterable, Sequence
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxinfer.buckets import bucket, geometric
from jaxinfer.config import ModelConfig, SchedulerConfig, SparsePrefillConfig
from jaxinfer.engine.batch import (
    BatchBuilder,
    BurstInput,
    SampleInput,
    StepInput,
    StepShape,
    all_step_shapes,
    sampling_arrays,
)
from jaxinfer.engine.compile_plan import SLOT_IMPORT, CompilePlan, PageCopy, SamplerRows, SlotImport
from jaxinfer.engine.scheduler import SchedulerOutput
from jaxinfer.engine.sharding import place_state, replicate
from jaxinfer.layers.kv_pages import PAD_SLOT, KVPages, gather_pages, scatter_pages
from jaxinfer.layers.sampler import apply_penalties, logprobs, sample
from pallas_kernels import resolve_impl, resolve_interpret

logger = logging.getLogger(__name__)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SamplerState:
    """Per-slot history for penalties: one row per running request (slot), V columns."""

    output_counts: jax.Array  # [S, V] int32 occurrences of each token in the output
    prompt_mask: jax.Array  # [S, V] bool token occurs in the prompt
    pending: jax.Array | None = None  # [S, F] draft head: target features of each slot's last computed token

    @classmethod
    def init(cls, num_slots: int, vocab_size: int, feature_size: int = 0) -> SamplerState:
        pending = jnp.zeros((num_slots, feature_size), jnp.float32) if feature_size else None
        return cls(jnp.zeros((num_slots, vocab_size), jnp.int32), jnp.zeros((num_slots, vocab_size), bool), pending)


class DeviceProgram(Protocol):
    """What the runner needs to compile and run a step it does not know (jaxinfer.spec's verify, draft
    and round steps): nothing below the speculative decoder imports it."""

    key: Hashable  # the compile-cache key: one executable per key
    shape: Hashable  # its shape, as the step log records it
    name: str  # its profiler annotation
    writes: bool  # returns (result, kv, sampler), the pool and sampler state donated; else only a result

    @property
    def annotation(self) -> dict: ...  # extra fields of the profiler annotation

    def function(self, runner: ModelRunner) -> Callable:
        """f(state, kv, sampler, inputs) for ``jax.jit`` (state: (model state, draft head state))."""

    def example(self, runner: ModelRunner) -> Any:
        """Inputs of the program's shape (only their shapes and dtypes are read)."""


@dataclasses.dataclass(frozen=True)
class StepResult:
    """Sampled tokens of a step (host arrays). A burst (``counts`` given) has a leading step axis K on
    every array: row r's tokens are ``tokens[:counts[r], r]``."""

    tokens: np.ndarray  # [N] int32 sampled token per row ([K, N] for a burst)
    token_logprobs: np.ndarray | None  # [N] float32
    top_ids: np.ndarray | None  # [N, max_logprobs] int32
    top_logprobs: np.ndarray | None  # [N, max_logprobs] float32
    counts: np.ndarray | None = None  # [N] int32 steps each row ran (a burst)


def _forward_step(graphdef, head_graphdef, catch_up, state, kv: KVPages, sampler: SamplerState, batch: StepInput):
    """The model over the step's tokens -> logits [N, V]; records prompt tokens for penalties; with a
    draft head, also writes the draft layer's KV of the step's tokens (``catch_up``, see
    jaxinfer.spec.eagle.catch_up).

    state = (model state, draft head state or None)."""
    model = nnx.merge(graphdef, state[0])
    pending = sampler.pending
    if head_graphdef is None:
        logits, kv = model(batch.tokens, batch.positions, kv, batch.meta, batch.logits_indices)
    else:
        head = nnx.merge(head_graphdef, state[1])
        rows = jnp.arange(batch.tokens.shape[0], dtype=jnp.int32)
        logits, kv, features = model(batch.tokens, batch.positions, kv, batch.meta, batch.logits_indices,
                                     head.config.feature_layers, rows)
        with jax.named_scope("draft_kv"):
            # the features come from early layers: a zero that depends on the logits orders the draft write
            # after the last layer's attention has read the pool (else XLA copies the whole pool to keep
            # that read intact: 4 copies, about 90 ms a step)
            features = features + jnp.nan_to_num(logits[0, 0] * 0.0)
            kv, pending = catch_up(head, model.embed, kv, pending, features, batch.tokens,
                                   batch.catch_up, model.config.num_layers)
    with jax.named_scope("penalty_state"):
        counts, seen = sampler.output_counts, sampler.prompt_mask
        outside = counts.shape[0]
        counts = counts.at[batch.reset_slots].set(0, mode="drop")
        seen = seen.at[batch.reset_slots].set(False, mode="drop")
        prompt_part = batch.tokens[batch.tokens.shape[0] - batch.token_slots.shape[0]:]
        seen = seen.at[jnp.where(batch.token_is_output, outside, batch.token_slots), prompt_part].set(
            True, mode="drop")
        counts = counts.at[jnp.where(batch.token_is_output, batch.token_slots, outside), prompt_part].add(
            1, mode="drop")
    return logits, kv, SamplerState(counts, seen, pending)


def _sample_step(num_top: int, logits: jax.Array, sampler: SamplerState, batch: SampleInput):
    """Penalties, sampling and logprobs for every row; counts the emitted tokens for penalties.

    A separate jitted function from the forward pass: it compiles once per row count, not once per
    step shape, and the sort and RNG it holds are the slowest parts to compile."""
    with jax.named_scope("sample"):
        counts, seen = sampler.output_counts, sampler.prompt_mask
        s = batch.sampling
        penalized = jnp.any((s.repetition_penalty != 1) | (s.presence_penalty != 0) | (s.frequency_penalty != 0))
        logits = jax.lax.cond(
            penalized, lambda x: apply_penalties(x, counts[batch.row_slots], seen[batch.row_slots], s),
            lambda x: x, logits)
        tokens = sample(logits, s)
        outside = counts.shape[0]
        counts = counts.at[jnp.where(batch.emit, batch.row_slots, outside), tokens].add(1, mode="drop")
        extra = ()
        if num_top:
            rows = tokens.shape[0]
            empty = (jnp.zeros(rows, jnp.float32), jnp.zeros((rows, num_top), jnp.int32),
                     jnp.zeros((rows, num_top), jnp.float32))
            extra = jax.lax.cond(batch.want_logprobs, lambda x: logprobs(x, tokens, num_top), lambda x: empty, logits)
    return (tokens, *extra), SamplerState(counts, seen, sampler.pending)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Chain:
    """Where a burst's rows stand at its end, the next burst's start (device arrays, [Bd])."""

    tokens: jax.Array  # int32 each row's input token for its next step
    running: jax.Array  # bool the row has not stopped at a stop token


@dataclasses.dataclass(frozen=True)
class BurstHandle:
    """A dispatched burst: its results stay on the device until ``ModelRunner.collect``."""

    results: tuple  # device arrays: tokens [K, Bd] (logprobs), counts [Bd]
    chain: Chain  # for a burst dispatched after this one, before its results are read


def _decode_burst(graphdef, head_graphdef, catch_up, num_top: int, max_steps: int, state, kv: KVPages,
                  sampler: SamplerState, batch: StepInput, burst: BurstInput, chain: Chain):
    """Up to ``max_steps`` decode steps in one call: each row feeds its sampled token back as the next
    step's input, and stops after a stop token or ``burst.budget`` steps; the loop ends when no row
    runs. A stopped row writes no KV and counts no tokens for penalties. Returns the sampled tokens
    (and logprobs) as [max_steps, Bd] arrays plus the steps each row ran, where the rows stand at the
    end (a Chain), and the new KV and sampler state. batch is the burst's first step (decode rows
    only); its input tokens and which rows run come from ``chain`` (a previous burst's, or the host's).
    With a draft head every step also writes the draft KV of its tokens (the first step's pairs come
    from the host; later steps pair each row's previous position, written in this burst)."""
    page_size = kv.page_size
    first = batch.positions
    pages = batch.meta.decode_page_indices

    def slot_of(positions):
        page = jnp.take_along_axis(pages, jnp.minimum(positions // page_size, pages.shape[1] - 1)[:, None], axis=1)
        return page[:, 0] * page_size + positions % page_size

    def step(carry):
        i, kv, sampler, tokens, alive, counts, outputs = carry
        running = alive & (counts < burst.budget)
        positions = first + i
        meta = dataclasses.replace(
            batch.meta, slot_mapping=jnp.where(running, slot_of(positions), PAD_SLOT),
            decode_kv_lens=jnp.where(running, positions + 1, 0))
        sampling = dataclasses.replace(batch.sample.sampling, index=batch.sample.sampling.index + i)
        pairs = batch.catch_up
        if pairs is not None:
            previous = jnp.maximum(positions - 1, 0)
            pairs = dataclasses.replace(
                pairs, positions=previous, is_last=pairs.is_last & running,
                slot_mapping=jnp.where(running, jnp.where(i == 0, pairs.slot_mapping, slot_of(previous)), PAD_SLOT))
        inputs = dataclasses.replace(batch, tokens=tokens, positions=positions, meta=meta, catch_up=pairs,
                                     sample=dataclasses.replace(batch.sample, sampling=sampling, emit=running))
        logits, kv, sampler = _forward_step(graphdef, head_graphdef, catch_up, state, kv, sampler, inputs)
        sampled, sampler = _sample_step(num_top, logits, sampler, inputs.sample)
        outputs = tuple(buffer.at[i].set(value) for buffer, value in zip(outputs, sampled, strict=True))
        new = sampled[0]
        counts = counts + running
        alive = alive & ~(running & jnp.any(new[:, None] == burst.stop_ids, axis=1))
        return i + 1, kv, sampler, jnp.where(running & alive, new, tokens), alive, counts, outputs

    rows = batch.tokens.shape[0]
    shapes = [(jnp.int32, ())] + ([(jnp.float32, ()), (jnp.int32, (num_top,)), (jnp.float32, (num_top,))]
                                  if num_top else [])
    outputs = tuple(jnp.zeros((max_steps, rows, *extra), dtype) for dtype, extra in shapes)
    carry = (jnp.int32(0), kv, sampler, chain.tokens, chain.running, jnp.zeros(rows, jnp.int32), outputs)
    _, kv, sampler, tokens, alive, counts, outputs = jax.lax.while_loop(
        lambda c: (c[0] < max_steps) & jnp.any(c[4] & (c[5] < burst.budget)), step, carry)
    # alive: not stopped by a stop token (a row that used up its steps goes on in a chained burst)
    return ((*outputs, counts), Chain(tokens, alive)), kv, sampler


def _kind(shape: StepShape) -> tuple[bool, bool, bool]:
    return shape.num_decode > 0, shape.num_prefill_tokens > 0, shape.blocked


def _dominates(big: StepShape, small: StepShape) -> bool:
    return (big.num_decode >= small.num_decode and big.decode_kv_tokens >= small.decode_kv_tokens
            and big.num_prefill_tokens >= small.num_prefill_tokens and big.prefill_kv_tokens >= small.prefill_kv_tokens)


def _size(shape: StepShape) -> int:
    """A step's work, roughly: what padding a smaller step up to it costs."""
    return shape.num_decode * shape.decode_kv_tokens + shape.num_prefill_tokens * max(shape.prefill_kv_tokens, 1)


def _abstract(leaf):
    """An array's shape and dtype, and its sharding if it is committed to one (a step's inputs are not:
    they follow the weights onto a replica group's devices)."""
    if isinstance(leaf, jax.Array):
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=leaf.sharding if leaf.committed else None)
    return leaf


class ModelRunner:
    def __init__(self, model: nnx.Module, model_config: ModelConfig, scheduler_config: SchedulerConfig,
                 num_pages: int, page_size: int, *, attention_impl: str = "auto", max_logprobs: int = 20,
                 sparse_prefill: SparsePrefillConfig | None = None, draft_head: nnx.Module | None = None,
                 catch_up: Callable | None = None, mesh: jax.sharding.Mesh | None = None,
                 eos_ids: frozenset[int] = frozenset()):
        """draft_head: an EAGLE draft head; its KV becomes one more layer of the pool and every step
        keeps it in step with the target through ``catch_up`` (jaxinfer.spec.eagle.catch_up: the
        runner holds the head's state but not its logic). mesh: the replica group's devices
        (see jaxinfer.engine.sharding); None: the default device. eos_ids: what ends a request
        (unless it ignores them) inside a burst of decode steps."""
        self.model_config = model_config
        self.scheduler_config = scheduler_config
        self.graphdef, model_state = nnx.split(model)
        if (draft_head is None) != (catch_up is None):
            raise ValueError("a draft head needs its catch_up function, and catch_up a draft head")
        self.head_graphdef, head_state = nnx.split(draft_head) if draft_head is not None else (None, None)
        self.state = (model_state, head_state)
        self.mesh = mesh
        self.draft_config = draft_head.config if draft_head is not None else None
        dtype = model.dtype
        kv_init = functools.partial(KVPages.init, model_config, num_pages, page_size, dtype,
                                    extra_layers=int(draft_head is not None))
        # the pool's first write faults in gigabytes of fresh pages (seconds on a small CPU host): it runs on
        # a thread while the step shapes compile, which read only the pool's shapes (_kv_abstract)
        self._kv: KVPages | None = None
        self._kv_pending: concurrent.futures.Future | None = None
        if mesh is None:
            pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="jaxinfer-kv-init")
            self._kv_pending = pool.submit(kv_init)
            pool.shutdown(wait=False)  # the allocation runs on; the pool's thread ends with it
            self._kv_abstract = jax.eval_shape(kv_init)
        else:  # placed on the group's devices below, its abstract shapes taken from there
            self._kv = kv_init()
        features = 3 * model_config.hidden_size if draft_head is not None else 0
        self.sampler = SamplerState.init(scheduler_config.max_num_seqs, model_config.vocab_size, features)
        self.impl = resolve_impl(attention_impl)
        if mesh is not None:
            if mesh.devices.size > 1 and self.impl == "pallas":
                raise ValueError("replica groups of several devices need attention_impl='reference' (the Pallas "
                                 "kernels are not wrapped in shard_map yet); use one device per replica")
            self.state = place_state(self.state, mesh)
            self.kv, self.sampler = replicate((self.kv, self.sampler), mesh)
            self._kv_abstract = jax.tree.map(_abstract, self.kv)
        # every step passes the weights as a flat list: flattening the nnx State visits each Variable
        # in Python (~0.8 ms a call for the embedded model), a list of arrays is flattened natively
        self.state, self._state_tree = jax.tree.flatten(self.state)
        self.interpret = resolve_interpret() if self.impl == "pallas" else False
        self.max_logprobs = max_logprobs
        self.sparse_prefill = sparse_prefill
        self.builder = BatchBuilder(scheduler_config, page_size, num_pages, sparse_prefill,
                                    catch_up=draft_head is not None)
        self._forward = jax.jit(self._flat(functools.partial(_forward_step, self.graphdef, self.head_graphdef,
                                                             catch_up)), donate_argnums=(1, 2))
        self._sample = jax.jit(functools.partial(_sample_step, max_logprobs), donate_argnums=(1,))
        self.eos_ids = eos_ids
        # decode-only steps run as bursts (one compiled burst per decode shape, no single steps)
        self.burst_steps = scheduler_config.decode_steps
        self._burst = jax.jit(self._flat(functools.partial(_decode_burst, self.graphdef, self.head_graphdef,
                                                           catch_up, max_logprobs, self.burst_steps)),
                              donate_argnums=(1, 2))
        self._executables: dict[object, Callable] = {}  # compile key (a step shape, a row count, ...) -> executable
        self._compiling: dict[object, concurrent.futures.Future] = {}  # key -> its compile in progress
        self._compile_lock = threading.Lock()
        self.num_compiles = 0
        self.compile_seconds = 0.0
        self.last_shape: StepShape | None = None

    @property
    def kv(self) -> KVPages:
        """The KV page pool (waits for its allocation the first time)."""
        if self._kv is None:
            self._kv = self._kv_pending.result()
            self._kv_pending = None
        return self._kv

    @kv.setter
    def kv(self, value: KVPages) -> None:
        self._kv = value

    def plan(self, programs: Sequence[DeviceProgram] = (), migration: bool = False) -> CompilePlan:
        """Everything this runner will run: every step shape the scheduler can produce with the
        samplers of their row counts, the ``programs`` a layer above hands down (speculation's), and
        with ``migration`` the page transfers of every page bucket and the slot import."""
        steps = all_step_shapes(self.scheduler_config, self.sparse_prefill)
        samplers = sorted({self.builder.num_rows(shape) for shape in steps if not self.bursts(shape)})
        return CompilePlan(tuple(samplers), tuple(steps), tuple(programs),
                           self.page_buckets() if migration else ())

    def compile(self, entry) -> None:
        """Compile one entry of a CompilePlan (nothing if it is compiled already)."""
        if isinstance(entry, StepShape):
            self.executable(entry)
        elif isinstance(entry, SamplerRows):
            self._sampler(entry.rows)
        elif isinstance(entry, PageCopy):
            self._page_function(entry.kind, entry.pages)
        elif isinstance(entry, SlotImport):
            self._slot_import()
        else:
            self.program_executable(entry)

    def executables(self) -> dict[Hashable, Callable]:
        """What has been compiled, by compile key (a plan entry; a program's key for a program)."""
        with self._compile_lock:
            return dict(self._executables)

    def warm_up(self, entries: Iterable, progress: Callable[[int, int], None] | None = None,
                stop: threading.Event | None = None) -> None:
        """Compile these entries of a CompilePlan in order (until ``stop`` is set)."""
        entries = list(entries)
        for done, entry in enumerate(entries, 1):
            if stop is not None and stop.is_set():
                return
            self.compile(entry)
            if progress is not None:
                progress(done, len(entries))

    def largest_shapes(self) -> list[StepShape]:
        """The largest step shape of each kind (decode only, prompt only, mixed, blocked): with these
        compiled every step can run, padded to one of them."""
        largest: dict[tuple, StepShape] = {}
        for shape in all_step_shapes(self.scheduler_config, self.sparse_prefill):
            kind = _kind(shape)
            if kind not in largest or _dominates(shape, largest[kind]):
                largest[kind] = shape
        return list(largest.values())

    def covering(self, shape: StepShape, rows: int | None = None) -> StepShape | None:
        """The compiled shape a step of ``shape`` runs as: the shape itself once compiled, else (while
        the rest compiles in the background) the smallest compiled shape of its kind that holds it;
        rows: only shapes with exactly that many decode rows. None: no such shape is compiled."""
        if shape in self._executables and rows in (None, shape.num_decode):
            return shape
        with self._compile_lock:  # compiled, or being compiled on the background thread (then waited for)
            keys = [*self._executables, *self._compiling]
        compiled = [key for key in keys if isinstance(key, StepShape)
                    and _kind(key) == _kind(shape) and _dominates(key, shape) and rows in (None, key.num_decode)]
        return min(compiled, key=_size, default=None)

    def executable(self, shape: StepShape) -> tuple[Callable, Callable | None]:
        """The compiled forward step of this shape and the compiled sampler of its row count; for a
        decode-only shape with bursts on, the compiled burst (and None)."""
        if self.bursts(shape):
            executable = self._executables.get(shape)
            if executable is None:
                example = self.builder.build(SchedulerOutput([], [], []), shape, impl=self.impl,
                                             interpret=self.interpret)
                burst = self.builder.build_burst(SchedulerOutput([], [], []), shape, self.eos_ids)
                chain = Chain(example.tokens, jnp.zeros(shape.num_decode, bool))
                executable = self._compile(shape, self._burst, self.state, self._kv_abstract, self.sampler, example,
                                           burst, chain)
            return executable, None
        sampler = self._sampler(self.builder.num_rows(shape))  # first: a compiled forward step finds its sampler
        forward = self._executables.get(shape)
        if forward is None:
            example = self.builder.build(SchedulerOutput([], [], []), shape, impl=self.impl, interpret=self.interpret)
            forward = self._compile(shape, self._forward, self.state, self._kv_abstract, self.sampler, example)
        return forward, sampler

    def _sampler(self, rows: int) -> Callable:
        """The compiled sampler of steps with ``rows`` sampling rows."""
        key = SamplerRows(rows)
        executable = self._executables.get(key)
        if executable is None:
            logits = jax.ShapeDtypeStruct((rows, self.model_config.vocab_size), jnp.float32)
            sample = sampling_arrays([None] * rows)
            example = jax.device_put(SampleInput(sampling=sample, row_slots=np.zeros(rows, np.int32),
                                                 emit=np.zeros(rows, bool), want_logprobs=np.array(False)))
            executable = self._compile(key, self._sample, logits, self.sampler, example)
        return executable

    def _flat(self, function: Callable) -> Callable:
        """function(state, ...) called with the state's flat leaves (``self.state``) instead."""
        def flat(leaves, *args):
            return function(jax.tree.unflatten(self._state_tree, leaves), *args)
        # the program keeps the function's name (jit_verify_step, jit_draft_step...): profiles tell them apart
        inner = function.func if isinstance(function, functools.partial) else function
        flat.__name__ = flat.__qualname__ = getattr(inner, "__name__", "flat")
        return flat

    def bursts(self, shape: StepShape) -> bool:
        """Decode-only steps of this shape run as bursts."""
        return self.burst_steps > 1 and shape.num_decode > 0 and not shape.num_prefill_tokens

    def _compile(self, key, function, *args) -> Callable:
        """Compile function for these arguments' shapes (only their shapes, dtypes and shardings are
        read: a compile on a background thread never touches arrays the engine donates meanwhile). A key
        another thread is compiling is waited for, not compiled twice."""
        with self._compile_lock:
            pending = self._compiling.get(key)
            if pending is None:
                mine = self._compiling[key] = concurrent.futures.Future()
        if pending is not None:
            return pending.result()
        start = time.perf_counter()
        try:
            executable = self._executables[key] = function.lower(*jax.tree.map(_abstract, args)).compile()
        except BaseException as exc:
            mine.set_exception(exc)
            raise
        finally:
            with self._compile_lock:
                del self._compiling[key]
        mine.set_result(executable)
        self.num_compiles += 1
        self.compile_seconds += time.perf_counter() - start
        logger.debug("compiled %s in %.2f s", key, time.perf_counter() - start)
        return executable

    def program_executable(self, program: DeviceProgram) -> Callable:
        """A device program a layer above hands the runner (a speculative round's verify or draft step:
        jaxinfer.spec), compiled on first use under its key; warm-up compiles all it will run."""
        executable = self._executables.get(program.key)
        if executable is None:
            function = jax.jit(self._flat(program.function(self)), donate_argnums=(1, 2) if program.writes else ())
            executable = self._compile(program.key, function, self.state, self.kv, self.sampler,
                                       program.example(self))
        return executable

    def run(self, program: DeviceProgram, inputs) -> Any:
        """Run a device program on this runner's weights, KV pool and sampler state; one that writes
        takes the new pool and state back. Returns its result as host arrays."""
        executable = self.program_executable(program)
        with jax.profiler.TraceAnnotation(program.name, **program.annotation):
            if not program.writes:
                return jax.device_get(executable(self.state, self.kv, self.sampler, inputs))
            self.last_shape = program.shape
            result, self.kv, self.sampler = executable(self.state, self.kv, self.sampler, inputs)
        return jax.device_get(result)

    def dispatch_burst(self, out: SchedulerOutput, shape: StepShape, after: BurstHandle | None = None) -> BurstHandle:
        """Start a burst without waiting for it (``out.steps`` per decode row). after: the burst
        dispatched just before, still running, whose rows (same order) this one continues: their
        input tokens come from its end on the device (``out.ahead``: the tokens it may add)."""
        executable, _ = self.executable(shape)
        self.last_shape = shape
        with jax.profiler.TraceAnnotation("build_batch"):
            batch = self.builder.build(out, shape, impl=self.impl, interpret=self.interpret)
            burst = self.builder.build_burst(out, shape, self.eos_ids)
            chain = after.chain if after is not None else Chain(batch.tokens, jnp.ones(shape.num_decode, bool))
        with jax.profiler.TraceAnnotation("decode_burst", decode_rows=shape.num_decode, steps=max(out.steps)):
            (results, chain), self.kv, self.sampler = executable(self.state, self.kv, self.sampler, batch, burst,
                                                                 chain)
        return BurstHandle(results, chain)

    @staticmethod
    def collect(handle: BurstHandle) -> StepResult:
        """A dispatched burst's results as host arrays (waits for it)."""
        with jax.profiler.TraceAnnotation("collect"):
            *results, counts = jax.device_get(handle.results)
        if len(results) == 1:
            return StepResult(results[0], None, None, None, counts)
        return StepResult(*results, counts)

    def execute(self, out: SchedulerOutput, shape: StepShape) -> StepResult:
        """Run one scheduled step (or burst); returns the sampled tokens (host arrays, one readback)."""
        if self.bursts(shape):
            if not out.burst:  # a decode step of a burst shape: a burst of one step
                out = dataclasses.replace(out, steps=[1] * len(out.decodes))
            return self.collect(self.dispatch_burst(out, shape))
        forward, sampler = self.executable(shape)
        self.last_shape = shape
        with jax.profiler.TraceAnnotation("build_batch"):
            batch = self.builder.build(out, shape, impl=self.impl, interpret=self.interpret)
        phase = ("decode" if not out.prefills else "blocked_prefill" if out.blocked else "prefill" if not out.decodes
                 else "prefill+decode")
        with jax.profiler.TraceAnnotation(phase, decode_rows=shape.num_decode, prompt_tokens=shape.num_prefill_tokens):
            logits, self.kv, self.sampler = forward(self.state, self.kv, self.sampler, batch)
        with jax.profiler.TraceAnnotation("sample"):
            results, self.sampler = sampler(logits, self.sampler, batch.sample)
            results = jax.device_get(results)
        if len(results) == 1:
            return StepResult(results[0], None, None, None)
        return StepResult(*results)

    # -- migration between replicas ---------------------------------------------------------------

    def page_buckets(self) -> tuple[int, ...]:
        """Page counts a migration transfer pads to (powers of two up to one request's pages)."""
        return geometric(1, 2, self.builder.max_pages_per_seq)

    def _page_function(self, kind: str, size: int) -> Callable:
        key = PageCopy(kind, size)
        executable = self._executables.get(key)
        if executable is None:
            pages = jax.ShapeDtypeStruct((size,), jnp.int32)
            if kind == "export":
                executable = self._compile(key, jax.jit(gather_pages), self.kv, pages)
            else:
                k, v = jax.eval_shape(gather_pages, self.kv, pages)
                executable = self._compile(key, jax.jit(scatter_pages, donate_argnums=(0,)), self.kv, pages, k, v)
        return executable

    def _padded(self, pages: list[int], fill: int) -> tuple[np.ndarray, int]:
        if len(pages) > self.builder.max_pages_per_seq:
            raise ValueError(f"{len(pages)} pages exceed one request's {self.builder.max_pages_per_seq}")
        size = bucket(len(pages), self.page_buckets())
        padded = np.full(size, fill, np.int32)
        padded[:len(pages)] = pages
        return padded, size

    def export_pages(self, pages: list[int], destination: jax.sharding.Sharding | None = None):
        """The KV of ``pages`` (all layers), padded to a page bucket and copied to ``destination``
        (another replica's devices) if given: an opaque payload for ``import_pages``."""
        if not pages:
            return None
        padded, size = self._padded(pages, 0)
        with jax.profiler.TraceAnnotation("migration_export", pages=len(pages)):
            k, v = self._page_function("export", size)(self.kv, padded)
            if destination is not None:
                k, v = jax.device_put((k, v), destination)
        return k, v

    def import_pages(self, pages: list[int], payload) -> None:
        """Write an ``export_pages`` payload of as many pages into ``pages`` of this pool."""
        if not pages:
            return
        k, v = payload
        padded, size = self._padded(pages, 2**30)
        if k.shape[2] != size:
            raise ValueError(f"a payload of {k.shape[2]} pages does not fit {len(pages)} pages")
        with jax.profiler.TraceAnnotation("migration_import", pages=len(pages)):
            self.kv = self._page_function("import", size)(self.kv, padded, k, v)

    @property
    def kv_sharding(self) -> jax.sharding.Sharding:
        return self.kv.k.sharding

    def export_slot(self, slot: int) -> tuple[np.ndarray, ...]:
        """A slot's penalty history (and draft head feature) as host arrays."""
        rows = [self.sampler.output_counts[slot], self.sampler.prompt_mask[slot]]
        if self.sampler.pending is not None:
            rows.append(self.sampler.pending[slot])
        return tuple(np.asarray(row) for row in jax.device_get(rows))

    def _slot_import(self) -> Callable:
        executable = self._executables.get(SLOT_IMPORT)
        if executable is None:
            def set_rows(sampler: SamplerState, slot, rows):
                pending = sampler.pending if len(rows) < 3 else sampler.pending.at[slot].set(rows[2])
                return SamplerState(sampler.output_counts.at[slot].set(rows[0]),
                                    sampler.prompt_mask.at[slot].set(rows[1]), pending)
            rows = [self.sampler.output_counts[0], self.sampler.prompt_mask[0]]
            if self.sampler.pending is not None:
                rows.append(self.sampler.pending[0])
            rows = tuple(jax.ShapeDtypeStruct(r.shape, r.dtype) for r in rows)
            executable = self._compile(SLOT_IMPORT, jax.jit(set_rows, donate_argnums=(0,)), self.sampler,
                                       jax.ShapeDtypeStruct((), jnp.int32), rows)
        return executable

    def import_slot(self, slot: int, rows: tuple[np.ndarray, ...]) -> None:
        self.sampler = self._slot_import()(self.sampler, np.int32(slot), rows)
