"""One replica's engine: step() = schedule -> run the model -> process outputs.

Not thread-safe by design: exactly one thread drives an Engine (the offline LLM directly, the server
through AsyncEngine's loop thread).
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import threading
import time
from collections.abc import Callable
from collections.abc import Sequence as Seq
from typing import NamedTuple

import jax
from flax import nnx

from jaxinfer.config import EngineConfig, ModelConfig
from jaxinfer.engine.batch import StepShape, step_shape
from jaxinfer.engine.block_manager import BlockManager
from jaxinfer.engine.client import EngineInfo
from jaxinfer.engine.compile_plan import CompilePlan, SamplerRows
from jaxinfer.engine.migration_port import MigrationPort
from jaxinfer.engine.model_runner import BurstHandle, ModelRunner, StepResult
from jaxinfer.engine.request_output import RequestOutput, TextStream, TokenLogprob, metrics_of
from jaxinfer.engine.scheduler import Scheduler, SchedulerOutput
from jaxinfer.engine.sequence import FinishReason, Sequence, SequenceStatus
from jaxinfer.layers import quant
from jaxinfer.layers.kv_pages import KVPages
from jaxinfer.layers.linear import QuantSpec
from jaxinfer.sampling_params import SamplingParams
from jaxinfer.spec.decoder import SpeculativeDecoder
from jaxinfer.spec.draft_head import quantize_draft_head
from jaxinfer.spec.drafter import EagleDrafter
from jaxinfer.spec.eagle import catch_up
from jaxinfer.tokenizer import Tokenizer

logger = logging.getLogger(__name__)


class RequestState(NamedTuple):
    """One request in a metrics snapshot (what a router needs to place and move it)."""

    request_id: str
    prompt_len: int
    context_len: int  # prompt + generated
    max_tokens: int
    running: bool  # has KV pages (False: waiting)


@dataclasses.dataclass(frozen=True)
class EngineMetrics:
    """A snapshot for the router and the server (Stats, /metrics)."""

    num_running: int
    num_waiting: int
    kv_pages_used: int
    kv_pages_free: int
    kv_pages_total: int
    page_size: int
    context_lengths: dict[str, int]  # request id -> current context (prompt + generated)
    last_step_seconds: float
    last_step_tokens: int
    last_step_decode_tokens: int  # of last_step_tokens, one per decoding request
    num_steps: int
    num_preemptions: int
    prefix_cache_hit_rate: float  # share of admitted prompt tokens served from the prefix cache
    generated_tokens_total: int
    prompt_tokens_total: int
    spec_rounds: int = 0  # speculative verification steps
    spec_verified_tokens: int = 0  # tree nodes the target verified
    spec_accepted_tokens: int = 0  # draft tokens accepted
    spec_fallback_steps: int = 0  # decode steps that could not speculate
    requests: tuple[RequestState, ...] = ()
    waiting_pages: int = 0  # pages the waiting requests need to be admitted


class _Burst(NamedTuple):
    """A burst on the device: what was scheduled, its handle, when it was dispatched, and whether
    dispatching it compiled (its time then says nothing about the step's speed)."""

    out: SchedulerOutput
    shape: StepShape
    handle: BurstHandle
    dispatched: float
    compiled: bool = False


class Engine:
    def __init__(self, model: nnx.Module, tokenizer: Tokenizer, config: EngineConfig | None = None,
                 draft_head: nnx.Module | None = None, mesh: jax.sharding.Mesh | None = None):
        """draft_head: the EAGLE draft head speculative methods 'eagle' and 'heterospec' need; mesh: the
        devices of this replica group (jaxinfer.replicas.placement), None for the default device."""
        config = config or EngineConfig()
        spec = config.speculative.with_policy()  # depth/nodes still unset (no tuned policy read): the defaults
        config = dataclasses.replace(config, speculative=spec)
        if spec.uses_draft_head and draft_head is None:
            raise ValueError(f"speculative method {spec.method!r} needs a draft head (train one with "
                             "launch/train_draft.py), or use method 'ngram'")
        draft_head = draft_head if spec.uses_draft_head else None
        self.model_config: ModelConfig = model.config
        self.tokenizer = tokenizer
        self.config = config
        self.scheduler_config = config.scheduler.resolve(self.model_config.max_position)
        page_size = config.cache.page_size
        dtype = model.dtype
        self.bytes_per_page = KVPages.bytes_per_page(self.model_config, page_size, dtype,
                                                     extra_layers=int(draft_head is not None))
        num_pages = config.cache.resolve_num_pages(self.bytes_per_page)
        max_len = self.scheduler_config.max_model_len
        if num_pages * page_size < max_len:
            raise ValueError(f"a KV pool of {num_pages} pages x {page_size} tokens cannot hold one request of "
                             f"max_model_len={max_len} tokens; add pages or lower max_model_len")
        self.block_manager = BlockManager(num_pages, page_size, config.cache.enable_prefix_caching)
        sparse = config.sparse_prefill
        if sparse.enabled and self.scheduler_config.max_num_batched_tokens < sparse.unisparse.block_size:
            logger.warning("sparse prefill is off: max_num_batched_tokens=%d is below its block size %d",
                           self.scheduler_config.max_num_batched_tokens, sparse.unisparse.block_size)
            sparse = dataclasses.replace(sparse, mode="off")
        if not sparse.enabled or max_len <= sparse.min_len:
            sparse = dataclasses.replace(sparse, mode="off")  # no prompt can be long enough
        self.sparse_prefill = sparse
        self.scheduler = Scheduler(self.scheduler_config, self.block_manager,
                                   long_prompt_len=sparse.min_len if sparse.enabled else 0,
                                   block_size=sparse.unisparse.block_size)
        if draft_head is not None and getattr(model, "quant_spec", None) is not None and quant.kernels_available():
            # the CPU fast path drafts with Q8_0 projections: a draft level streams a quarter of the float weights
            draft_head = quantize_draft_head(draft_head, QuantSpec("q8_0", "q8_0", model.quant_spec.activations))
        self.runner = ModelRunner(model, self.model_config, self.scheduler_config, num_pages, page_size,
                                  attention_impl=config.attention_impl, max_logprobs=config.max_logprobs,
                                  sparse_prefill=sparse, draft_head=draft_head,
                                  catch_up=catch_up if draft_head is not None else None, mesh=mesh,
                                  eos_ids=frozenset(tokenizer.eos_ids))
        self.spec = None
        if spec.enabled:
            self.spec = SpeculativeDecoder(spec, self.scheduler, self.runner)
            if spec.uses_draft_head:
                self.spec.drafter = EagleDrafter(spec, self.scheduler_config, self.runner, self.spec.row_buckets)
        self._streams: dict[str, TextStream] = {}
        self.migration = MigrationPort(self)
        self._ids = itertools.count()
        self._eos_ids = frozenset(tokenizer.eos_ids)
        self.num_steps = 0
        self.last_step_seconds = 0.0
        self.last_step_tokens = 0
        self.last_step_decode_tokens = 0
        self.generated_tokens_total = 0
        self.prompt_tokens_total = 0
        # set to a list to record (shape, start, end, decode rows' context lengths) of every step
        self.step_log: list | None = None
        self._inflight: _Burst | None = None  # a burst dispatched, not yet collected
        self._pending: list[RequestOutput] = []  # outputs of a settled burst, returned by the next step
        self._collected = 0.0  # when the latest step's results came back
        self._compiler: threading.Thread | None = None  # a background warm-up
        self._stop_compiling = threading.Event()

    def compile_plan(self, migration: bool = False) -> CompilePlan:
        """Everything this engine's runner will run (jaxinfer.engine.compile_plan): the step shapes,
        their samplers, speculation's programs and, with ``migration`` (a replica among several), the
        page transfers."""
        return self.runner.plan(self.spec.programs() if self.spec is not None else (), migration)

    def warm_up(self, progress: Callable[[int, int], None] | None = None, background: bool = False,
                on_done: Callable[[int, float], None] | None = None,
                migration: bool = False) -> threading.Thread | None:
        """Compile the whole compile plan. background: compile only the largest shape of each unblocked
        kind now (decode, prompt, mixed: any such step fits one of them, padded) and the other step
        shapes on a thread, returned (on_done(entries, seconds) when it ends), the largest blocked
        (long-prompt) shape first; until a step's own shape is compiled, the step runs padded to the
        smallest compiled shape that holds it, or waits for the one being compiled (a long prompt in
        the first seconds), so nothing compiles on the request path either way. Speculation's
        programs and the migration transfers always compile before this returns."""
        plan = self.compile_plan(migration)
        if not background:
            self.runner.warm_up(plan, progress)
            return None
        largest = self.runner.largest_shapes()
        now = [s for s in largest if not s.blocked] + [e for e in plan if not isinstance(e, (StepShape, SamplerRows))]
        rest = [s for s in largest if s.blocked] + [e for e in plan if e not in now and e not in largest]
        self.runner.warm_up(now, progress)

        def compile_rest() -> None:
            start = time.perf_counter()
            self.runner.warm_up(rest, stop=self._stop_compiling)
            if on_done is not None and not self._stop_compiling.is_set():
                on_done(len(rest), time.perf_counter() - start)
        thread = self._compiler = threading.Thread(target=compile_rest, name="jaxinfer-compile")
        thread.start()
        return thread

    def close(self) -> None:
        """Stop a background warm-up after the shape it is compiling (a process must not exit while
        XLA compiles on another thread)."""
        self._stop_compiling.set()
        if self._compiler is not None:
            self._compiler.join()

    def _shape(self, out: SchedulerOutput, exact: bool = False) -> StepShape:
        """The bucketed shape of a scheduled step; unless exact, the compiled shape it runs as."""
        shape = step_shape(out, self.scheduler_config, self.sparse_prefill.unisparse.block_size)
        return shape if exact else self.runner.covering(shape) or shape

    # -- requests -------------------------------------------------------------------------------

    def validate(self, prompt: str | Seq[int], params: SamplingParams) -> list[int]:
        """Check a request before anything is scheduled; returns its prompt token ids."""
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params must be SamplingParams, got {type(params).__name__}")
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("prompt is empty")
            ids = self.tokenizer.encode(prompt)
        elif isinstance(prompt, Seq) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            ids = list(prompt)
            vocab = self.model_config.vocab_size
            bad = [t for t in ids if not 0 <= t < vocab]
            if bad:
                raise ValueError(f"prompt token id {bad[0]} outside the vocabulary [0, {vocab})")
        else:
            raise ValueError(f"prompt must be a string or a list of token ids, got {type(prompt).__name__}")
        if not ids:
            raise ValueError("prompt is empty")
        max_len = self.scheduler_config.max_model_len
        if len(ids) >= max_len:
            raise ValueError(f"prompt of {len(ids)} tokens leaves no room to generate within the context "
                             f"limit of {max_len} tokens")
        if params.logprobs is not None and params.logprobs > self.config.max_logprobs:
            raise ValueError(f"logprobs={params.logprobs} exceeds the maximum of {self.config.max_logprobs}")
        bad_stop = [t for t in params.stop_token_ids if t >= self.model_config.vocab_size]
        if bad_stop:
            raise ValueError(f"stop token id {bad_stop[0]} outside the vocabulary [0, {self.model_config.vocab_size})")
        return ids

    def add_request(self, prompt: str | Seq[int], params: SamplingParams, request_id: str | None = None,
                    arrival_time: float | None = None) -> str:
        """Validate and queue a request (raises ValueError, or QueueFullError when the queue is full)."""
        ids = self.validate(prompt, params)
        params = params.seeded()
        request_id = str(next(self._ids)) if request_id is None else request_id
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already in use")
        seq = Sequence(request_id, ids, params, arrival_time)
        if self.sparse_prefill.mode == "sparse" and self.scheduler.is_long(seq):
            # its KV differs from dense KV: cached pages are shared only with the same sparse setting
            seq.cache_salt = repr(self.sparse_prefill.unisparse).encode()
        self.scheduler.add(seq)
        self._streams[request_id] = TextStream(self.tokenizer, params.stop)
        return request_id

    def abort(self, request_id: str) -> RequestOutput | None:
        """Cancel a request and free its pages at once; returns its final output (None if unknown)."""
        settled = self.settle()  # a running burst's tokens of this request come with its final output
        mine = [o for o in settled if o.request_id == request_id]
        self._pending += [o for o in settled if o.request_id != request_id]
        seq = self.scheduler.find(request_id)
        if seq is None:
            self._pending += mine  # it finished in that burst
            return None
        self.scheduler.finish(seq, FinishReason.ABORT)
        stream = self._streams.pop(request_id)
        delta = stream.finish()
        new_ids = [t for o in mine for t in o.new_token_ids]
        return self._output(seq, new_ids, "".join(o.new_text for o in mine) + delta, stream.text)

    @property
    def has_unfinished(self) -> bool:
        """Requests are queued or running, or outputs wait for the next step."""
        return self.scheduler.num_unfinished > 0 or bool(self._pending)

    # -- stepping -------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """One scheduled step, or one burst of decode steps collected. Returns an output for every
        request that gained tokens or finished.

        Bursts run ahead of the host: while burst N runs on the device, the burst after it is planned
        and dispatched for the same rows (their input tokens taken from N's end, on the device); then
        N's tokens are read and detokenized, and the next call collects the burst left running.
        Anything that needs the host's view complete first calls ``settle``."""
        outputs, self._pending = self._pending, []
        start = time.perf_counter()
        spec = self.spec
        if self._inflight is None:
            with jax.profiler.TraceAnnotation("schedule"):
                # a speculative engine first decides whether the step is a round; a plain one may burst
                out = self.scheduler.schedule(burst=spec is None)
                speculate = spec is not None and spec.eligible(out.decodes, bool(out.prefills))
                if spec is not None and not speculate:
                    self.scheduler.plan_burst(out)
            if out.empty:
                return outputs
            if not out.burst:
                return outputs + self._step(out, start, speculate)
            compiles = self.runner.num_compiles
            shape = self._shape(out)
            handle = self.runner.dispatch_burst(out, shape)
            self._inflight = _Burst(out, shape, handle, start, self.runner.num_compiles != compiles)
        current = self._inflight
        with jax.profiler.TraceAnnotation("schedule"):
            # a speculative engine ends the chain when its next step should be a round
            live = [seq for seq in current.out.decodes if seq.status is SequenceStatus.RUNNING]
            out = None if spec is not None and spec.eligible(live, False, count=False) else \
                self.scheduler.chain_burst(current.out)
            if out is not None and spec is not None:
                spec.eligible(live, False)  # the chained burst is this decision
        self._inflight = None
        # the chained burst takes the rows of the one before: a compiled shape with as many
        # (none yet, during a background warm-up: the chain ends; its pages stay with the rows)
        shape = out and self.runner.covering(self._shape(out, exact=True), rows=current.shape.num_decode)
        if shape:
            self._inflight = _Burst(out, shape, self.runner.dispatch_burst(out, shape, after=current.handle),
                                    time.perf_counter())
        return outputs + self._collect(current)

    def settle(self, keep: bool = False) -> list[RequestOutput]:
        """Collect a burst still running on the device, so that the host's view of every request is
        complete (before an abort, a migration, ...). Returns its outputs for the caller to deliver,
        or with ``keep`` holds them for the next step to return."""
        if self._inflight is None:
            return []
        current, self._inflight = self._inflight, None
        outputs = self._collect(current)
        if keep:
            self._pending += outputs
            return []
        return outputs

    def _collect(self, burst: _Burst) -> list[RequestOutput]:
        result = self.runner.collect(burst.handle)
        with jax.profiler.TraceAnnotation("detokenize"):
            outputs = self._postprocess_burst(burst.out, result)
        end = time.perf_counter()
        begin = max(burst.dispatched, self._collected)  # the device ran it after the one before
        self._collected = end
        steps = int(result.counts.max(initial=0))
        self.num_steps += steps
        self.last_step_seconds = end - begin
        if self.step_log is not None:  # a burst as its steps, each an equal share of its time
            done = [seq.num_computed - int(n) for seq, n in zip(burst.out.decodes, result.counts, strict=False)]
            self.step_log += [(burst.shape, begin + (end - begin) * i / steps, begin + (end - begin) * (i + 1) / steps,
                               tuple(c + i + 1 for c, n in zip(done, result.counts, strict=False) if n > i))
                              for i in range(steps)]
        self.last_step_tokens = self.last_step_decode_tokens = int(result.counts.sum())
        if self.spec is not None and not burst.compiled:
            self.spec.observe_step("plain", len(burst.out.decodes), self.last_step_tokens, end - begin)
        return outputs

    def _step(self, out: SchedulerOutput, start: float, speculate: bool) -> list[RequestOutput]:
        """An ordinary step (or a speculative round): run and read back at once."""
        generated = self.generated_tokens_total
        compile_seconds = self.runner.compile_seconds
        contexts = tuple(seq.num_computed + 1 for seq in out.decodes) if self.step_log is not None else ()
        outputs = self._speculate(out.decodes) if speculate else None
        if outputs is None:  # a plain step (after a round with nothing drafted: what choosing a round gave)
            shape = self._shape(out)
            result = self.runner.execute(out, shape)
            with jax.profiler.TraceAnnotation("detokenize"):
                outputs = self._postprocess(out, result, shape.num_decode)
        if self.spec is not None and not out.prefills and self.runner.compile_seconds == compile_seconds:
            self.spec.observe_step("spec" if speculate else "plain", len(out.decodes),
                                   self.generated_tokens_total - generated, time.perf_counter() - start)
        self.num_steps += 1
        end = self._collected = time.perf_counter()
        self.last_step_seconds = end - start
        if self.step_log is not None:
            self.step_log.append((self.runner.last_shape, start, end, contexts))
        self.last_step_tokens = out.num_tokens
        self.last_step_decode_tokens = len(out.decodes)
        return outputs

    def _postprocess(self, out, result: StepResult, num_decode_rows: int) -> list[RequestOutput]:
        if result.counts is not None:
            return self._postprocess_burst(out, result)
        now = time.perf_counter()
        emitted: list[tuple[int, Sequence]] = [(row, seq) for row, seq in enumerate(out.decodes)]
        for seq in out.decodes:
            self.scheduler.computed(seq, 1)
        for index, chunk in enumerate(out.prefills):
            self.scheduler.computed(chunk.seq, chunk.num_tokens)
            if chunk.start < len(chunk.seq.prompt_ids):
                self.prompt_tokens_total += min(chunk.num_tokens, len(chunk.seq.prompt_ids) - chunk.start)
            if chunk.completes_prompt:
                emitted.append((num_decode_rows + index, chunk.seq))
        return [self._advance(seq, [int(result.tokens[row])], [_logprob(seq, result, row)], now)
                for row, seq in emitted]

    def _postprocess_burst(self, out, result: StepResult) -> list[RequestOutput]:
        """A burst's tokens: row r ran counts[r] steps, each computing one token's KV and sampling one."""
        now = time.perf_counter()
        outputs = []
        for row, seq in enumerate(out.decodes):
            count = int(result.counts[row])
            if seq.finished or not count:  # finished (or aborted) while the burst ran: its tokens go
                continue
            logprobs = [_logprob(seq, result, (step, row)) for step in range(count)]
            outputs.append(self._advance(seq, result.tokens[:count, row].tolist(), logprobs, now))
            self.scheduler.computed(seq, count)  # after the append: page hashes cover the burst's tokens
        return outputs

    def _speculate(self, decodes: list[Sequence]) -> list[RequestOutput] | None:
        """One speculative round for the decoding requests: each gains one or more tokens (None: no
        round, nothing was drafted)."""
        emitted = self.spec.step(decodes)
        if emitted is None:
            return None
        now = time.perf_counter()
        outputs = []
        with jax.profiler.TraceAnnotation("detokenize"):
            for seq, (tokens, logprobs) in zip(decodes, emitted, strict=True):
                outputs.append(self._advance(seq, tokens, logprobs or [None] * len(tokens), now))
                self.scheduler.computed(seq, len(tokens))  # after the append: page hashes cover the tokens
                if not seq.finished:
                    self.spec.release(seq)
        return outputs

    @property
    def info(self) -> EngineInfo:
        return EngineInfo(self.tokenizer, self.scheduler_config.max_model_len, self.model_config.vocab_size)

    # -- a request's text stream, moved with it between replicas (jaxinfer.engine.migration_port) ---

    def has_stream(self, request_id: str) -> bool:
        """A request of this engine that has not finished."""
        return request_id in self._streams

    def take_stream(self, request_id: str) -> TextStream:
        """Hand over a request's detokenizing stream (it leaves this engine)."""
        return self._streams.pop(request_id)

    def give_stream(self, request_id: str, stream: TextStream) -> None:
        """Take over an arriving request's stream (or one that comes back)."""
        stream.bind(self.tokenizer)
        self._streams[request_id] = stream

    def _advance(self, seq: Sequence, tokens: list[int], logprobs: list, now: float) -> RequestOutput:
        """Append new tokens one by one, detokenize them and stop at the first that finishes seq
        (the rest are dropped)."""
        params, stream = seq.params, self._streams[seq.request_id]
        if seq.first_token_time is None:
            seq.first_token_time = now
        delta, reason, new = "", None, []
        for token, logprob in zip(tokens, logprobs, strict=True):
            seq.output_ids.append(token)
            new.append(token)
            self.generated_tokens_total += 1
            if logprob is not None:
                seq.logprobs.append(logprob)
            is_stop_token = (token in self._eos_ids and not params.ignore_eos) or token in params.stop_token_ids
            delta += stream.push(None if is_stop_token else token)
            if is_stop_token or stream.stopped:
                reason = FinishReason.STOP
            elif len(seq.output_ids) >= params.max_tokens or seq.num_tokens >= self.scheduler_config.max_model_len:
                reason = FinishReason.LENGTH
            if reason is not None:
                break
        if reason is not None:
            self.scheduler.finish(seq, reason)
            delta += stream.finish()
            del self._streams[seq.request_id]
        return self._output(seq, new, delta, stream.text[:stream.emitted])

    def _output(self, seq: Sequence, new_ids: list[int], delta: str, text: str) -> RequestOutput:
        logprobs = None
        if seq.params.logprobs is not None:
            logprobs = [TokenLogprob(t, lp, top) for t, (lp, top) in zip(seq.output_ids, seq.logprobs, strict=False)]
        return RequestOutput(
            request_id=seq.request_id, prompt_ids=seq.prompt_ids, output_ids=list(seq.output_ids),
            text=text, new_token_ids=new_ids,
            new_text=delta, finished=seq.status is SequenceStatus.FINISHED,
            finish_reason=seq.finish_reason.value if seq.finish_reason else None, logprobs=logprobs,
            metrics=metrics_of(seq))

    # -- metrics --------------------------------------------------------------------------------

    def metrics(self) -> EngineMetrics:
        blocks = self.block_manager
        hit_rate = blocks.prefix_hit_tokens / blocks.prefix_query_tokens if blocks.prefix_query_tokens else 0.0
        requests = tuple(RequestState(s.request_id, len(s.prompt_ids), s.num_tokens, s.params.max_tokens,
                                      s.status is SequenceStatus.RUNNING)
                         for s in (*self.scheduler.running, *self.scheduler.waiting))
        return EngineMetrics(
            num_running=len(self.scheduler.running), num_waiting=len(self.scheduler.waiting),
            kv_pages_used=blocks.num_used, kv_pages_free=blocks.num_free, kv_pages_total=blocks.num_pages,
            page_size=blocks.page_size,
            context_lengths={s.request_id: s.num_tokens for s in (*self.scheduler.running, *self.scheduler.waiting)},
            last_step_seconds=self.last_step_seconds, last_step_tokens=self.last_step_tokens,
            last_step_decode_tokens=self.last_step_decode_tokens,
            num_steps=self.num_steps, num_preemptions=self.scheduler.num_preemptions,
            prefix_cache_hit_rate=hit_rate, generated_tokens_total=self.generated_tokens_total,
            prompt_tokens_total=self.prompt_tokens_total, requests=requests,
            waiting_pages=sum(blocks.pages_needed(s.num_tokens) for s in self.scheduler.waiting),
            **self._spec_metrics())

    def _spec_metrics(self) -> dict[str, int]:
        if self.spec is None:
            return {}
        s = self.spec.stats
        return dict(spec_rounds=s.rounds, spec_verified_tokens=s.verified_tokens,
                    spec_accepted_tokens=s.accepted_tokens, spec_fallback_steps=s.fallback_steps)

    # -- offline --------------------------------------------------------------------------------

    def generate(self, prompts: Seq[str | Seq[int]], params: SamplingParams | Seq[SamplingParams],
                 on_output: Callable[[RequestOutput], None] | None = None) -> list[RequestOutput]:
        """Run prompts to completion; outputs in prompt order. Every request is validated first."""
        params_list = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
        if len(params_list) != len(prompts):
            raise ValueError(f"got {len(prompts)} prompts but {len(params_list)} SamplingParams")
        token_ids = [self.validate(prompt, p) for prompt, p in zip(prompts, params_list, strict=True)]
        ids = [str(next(self._ids)) for _ in prompts]
        pending = list(zip(ids, token_ids, params_list, strict=True))[::-1]  # text already tokenized
        final: dict[str, RequestOutput] = {}
        while len(final) < len(ids):
            while pending and len(self.scheduler.waiting) < self.scheduler_config.max_waiting:
                request_id, prompt, p = pending.pop()
                self.add_request(prompt, p, request_id)
            for output in self.step():
                if on_output is not None:
                    on_output(output)
                if output.finished:
                    final[output.request_id] = output
        return [final[i] for i in ids]


def _logprob(seq: Sequence, result: StepResult, index) -> tuple[float, dict[int, float]] | None:
    """The (token logprob, top logprobs) seq asked for from row ``index`` of a step's result."""
    if seq.params.logprobs is None or result.token_logprobs is None:
        return None
    count = seq.params.logprobs
    ids, values = result.top_ids[index][:count].tolist(), result.top_logprobs[index][:count].tolist()
    return float(result.token_logprobs[index]), dict(zip(ids, values, strict=True))
