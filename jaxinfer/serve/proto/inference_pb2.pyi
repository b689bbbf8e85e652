from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class FinishReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FINISH_REASON_UNSPECIFIED: _ClassVar[FinishReason]
    FINISH_REASON_STOP: _ClassVar[FinishReason]
    FINISH_REASON_LENGTH: _ClassVar[FinishReason]
    FINISH_REASON_ABORT: _ClassVar[FinishReason]
FINISH_REASON_UNSPECIFIED: FinishReason
FINISH_REASON_STOP: FinishReason
FINISH_REASON_LENGTH: FinishReason
FINISH_REASON_ABORT: FinishReason

class ChatMessage(_message.Message):
    __slots__ = ("role", "content")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    role: str
    content: str
    def __init__(self, role: _Optional[str] = ..., content: _Optional[str] = ...) -> None: ...

class Chat(_message.Message):
    __slots__ = ("messages",)
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    messages: _containers.RepeatedCompositeFieldContainer[ChatMessage]
    def __init__(self, messages: _Optional[_Iterable[_Union[ChatMessage, _Mapping]]] = ...) -> None: ...

class TokenIds(_message.Message):
    __slots__ = ("ids",)
    IDS_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, ids: _Optional[_Iterable[int]] = ...) -> None: ...

class SamplingParams(_message.Message):
    __slots__ = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty", "seed", "max_tokens", "ignore_eos", "stop", "stop_token_ids", "logprobs", "sparse_prefill")
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    MIN_P_FIELD_NUMBER: _ClassVar[int]
    REPETITION_PENALTY_FIELD_NUMBER: _ClassVar[int]
    PRESENCE_PENALTY_FIELD_NUMBER: _ClassVar[int]
    FREQUENCY_PENALTY_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    IGNORE_EOS_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    STOP_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    SPARSE_PREFILL_FIELD_NUMBER: _ClassVar[int]
    temperature: float
    top_p: float
    top_k: int
    min_p: float
    repetition_penalty: float
    presence_penalty: float
    frequency_penalty: float
    seed: int
    max_tokens: int
    ignore_eos: bool
    stop: _containers.RepeatedScalarFieldContainer[str]
    stop_token_ids: _containers.RepeatedScalarFieldContainer[int]
    logprobs: int
    sparse_prefill: bool
    def __init__(self, temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., top_k: _Optional[int] = ..., min_p: _Optional[float] = ..., repetition_penalty: _Optional[float] = ..., presence_penalty: _Optional[float] = ..., frequency_penalty: _Optional[float] = ..., seed: _Optional[int] = ..., max_tokens: _Optional[int] = ..., ignore_eos: _Optional[bool] = ..., stop: _Optional[_Iterable[str]] = ..., stop_token_ids: _Optional[_Iterable[int]] = ..., logprobs: _Optional[int] = ..., sparse_prefill: _Optional[bool] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("request_id", "text", "chat", "token_ids", "params")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    CHAT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    text: str
    chat: Chat
    token_ids: TokenIds
    params: SamplingParams
    def __init__(self, request_id: _Optional[str] = ..., text: _Optional[str] = ..., chat: _Optional[_Union[Chat, _Mapping]] = ..., token_ids: _Optional[_Union[TokenIds, _Mapping]] = ..., params: _Optional[_Union[SamplingParams, _Mapping]] = ...) -> None: ...

class TopLogprob(_message.Message):
    __slots__ = ("token_id", "logprob")
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_FIELD_NUMBER: _ClassVar[int]
    token_id: int
    logprob: float
    def __init__(self, token_id: _Optional[int] = ..., logprob: _Optional[float] = ...) -> None: ...

class TokenLogprob(_message.Message):
    __slots__ = ("token_id", "logprob", "top")
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_FIELD_NUMBER: _ClassVar[int]
    TOP_FIELD_NUMBER: _ClassVar[int]
    token_id: int
    logprob: float
    top: _containers.RepeatedCompositeFieldContainer[TopLogprob]
    def __init__(self, token_id: _Optional[int] = ..., logprob: _Optional[float] = ..., top: _Optional[_Iterable[_Union[TopLogprob, _Mapping]]] = ...) -> None: ...

class Usage(_message.Message):
    __slots__ = ("prompt_tokens", "completion_tokens", "cached_prompt_tokens", "ttft_seconds", "e2e_seconds")
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CACHED_PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TTFT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    E2E_SECONDS_FIELD_NUMBER: _ClassVar[int]
    prompt_tokens: int
    completion_tokens: int
    cached_prompt_tokens: int
    ttft_seconds: float
    e2e_seconds: float
    def __init__(self, prompt_tokens: _Optional[int] = ..., completion_tokens: _Optional[int] = ..., cached_prompt_tokens: _Optional[int] = ..., ttft_seconds: _Optional[float] = ..., e2e_seconds: _Optional[float] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("request_id", "token_ids", "text", "logprobs", "finish_reason", "usage")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    text: str
    logprobs: _containers.RepeatedCompositeFieldContainer[TokenLogprob]
    finish_reason: FinishReason
    usage: Usage
    def __init__(self, request_id: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., text: _Optional[str] = ..., logprobs: _Optional[_Iterable[_Union[TokenLogprob, _Mapping]]] = ..., finish_reason: _Optional[_Union[FinishReason, str]] = ..., usage: _Optional[_Union[Usage, _Mapping]] = ...) -> None: ...

class TokenizeRequest(_message.Message):
    __slots__ = ("text", "chat")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    CHAT_FIELD_NUMBER: _ClassVar[int]
    text: str
    chat: Chat
    def __init__(self, text: _Optional[str] = ..., chat: _Optional[_Union[Chat, _Mapping]] = ...) -> None: ...

class TokenizeResponse(_message.Message):
    __slots__ = ("token_ids",)
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, token_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class DetokenizeRequest(_message.Message):
    __slots__ = ("token_ids", "keep_special_tokens")
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    KEEP_SPECIAL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    keep_special_tokens: bool
    def __init__(self, token_ids: _Optional[_Iterable[int]] = ..., keep_special_tokens: _Optional[bool] = ...) -> None: ...

class DetokenizeResponse(_message.Message):
    __slots__ = ("text",)
    TEXT_FIELD_NUMBER: _ClassVar[int]
    text: str
    def __init__(self, text: _Optional[str] = ...) -> None: ...

class StatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class EngineStats(_message.Message):
    __slots__ = ("num_running", "num_waiting", "kv_pages_used", "kv_pages_free", "kv_pages_total", "page_size", "num_steps", "num_preemptions", "prefix_cache_hit_rate", "prompt_tokens_total", "generated_tokens_total", "last_step_seconds", "last_step_tokens")
    NUM_RUNNING_FIELD_NUMBER: _ClassVar[int]
    NUM_WAITING_FIELD_NUMBER: _ClassVar[int]
    KV_PAGES_USED_FIELD_NUMBER: _ClassVar[int]
    KV_PAGES_FREE_FIELD_NUMBER: _ClassVar[int]
    KV_PAGES_TOTAL_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    NUM_STEPS_FIELD_NUMBER: _ClassVar[int]
    NUM_PREEMPTIONS_FIELD_NUMBER: _ClassVar[int]
    PREFIX_CACHE_HIT_RATE_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    GENERATED_TOKENS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    LAST_STEP_SECONDS_FIELD_NUMBER: _ClassVar[int]
    LAST_STEP_TOKENS_FIELD_NUMBER: _ClassVar[int]
    num_running: int
    num_waiting: int
    kv_pages_used: int
    kv_pages_free: int
    kv_pages_total: int
    page_size: int
    num_steps: int
    num_preemptions: int
    prefix_cache_hit_rate: float
    prompt_tokens_total: int
    generated_tokens_total: int
    last_step_seconds: float
    last_step_tokens: int
    def __init__(self, num_running: _Optional[int] = ..., num_waiting: _Optional[int] = ..., kv_pages_used: _Optional[int] = ..., kv_pages_free: _Optional[int] = ..., kv_pages_total: _Optional[int] = ..., page_size: _Optional[int] = ..., num_steps: _Optional[int] = ..., num_preemptions: _Optional[int] = ..., prefix_cache_hit_rate: _Optional[float] = ..., prompt_tokens_total: _Optional[int] = ..., generated_tokens_total: _Optional[int] = ..., last_step_seconds: _Optional[float] = ..., last_step_tokens: _Optional[int] = ...) -> None: ...

class ReplicaGroupStats(_message.Message):
    __slots__ = ("name", "num_replicas", "min_context", "max_context", "engine", "replicas")
    NAME_FIELD_NUMBER: _ClassVar[int]
    NUM_REPLICAS_FIELD_NUMBER: _ClassVar[int]
    MIN_CONTEXT_FIELD_NUMBER: _ClassVar[int]
    MAX_CONTEXT_FIELD_NUMBER: _ClassVar[int]
    ENGINE_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    name: str
    num_replicas: int
    min_context: int
    max_context: int
    engine: EngineStats
    replicas: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, name: _Optional[str] = ..., num_replicas: _Optional[int] = ..., min_context: _Optional[int] = ..., max_context: _Optional[int] = ..., engine: _Optional[_Union[EngineStats, _Mapping]] = ..., replicas: _Optional[_Iterable[int]] = ...) -> None: ...

class RouterStats(_message.Message):
    __slots__ = ("name", "migration", "migrations_started", "migrations_completed", "migrations_live", "migrations_recompute", "migrations_refused", "migrations_gone", "migrations_failed", "migrations_in_flight", "kv_pages_copied", "pause_seconds", "ms_per_decision", "refinements", "replans", "migrations_timed_out", "replicas_lost", "replicas_rejoined", "requests_resumed", "requests_failed")
    NAME_FIELD_NUMBER: _ClassVar[int]
    MIGRATION_FIELD_NUMBER: _ClassVar[int]
    MIGRATIONS_STARTED_FIELD_NUMBER: _ClassVar[int]
    MIGRATIONS_COMPLETED_FIELD_NUMBER: _ClassVar[int]
    MIGRATIONS_LIVE_FIELD_NUMBER: _ClassVar[int]
    MIGRATIONS_RECOMPUTE_FIELD_NUMBER: _ClassVar[int]
    MIGRATIONS_REFUSED_FIELD_NUMBER: _ClassVar[int]
    MIGRATIONS_GONE_FIELD_NUMBER: _ClassVar[int]
    MIGRATIONS_FAILED_FIELD_NUMBER: _ClassVar[int]
    MIGRATIONS_IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    KV_PAGES_COPIED_FIELD_NUMBER: _ClassVar[int]
    PAUSE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    MS_PER_DECISION_FIELD_NUMBER: _ClassVar[int]
    REFINEMENTS_FIELD_NUMBER: _ClassVar[int]
    REPLANS_FIELD_NUMBER: _ClassVar[int]
    MIGRATIONS_TIMED_OUT_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_LOST_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_REJOINED_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_RESUMED_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_FAILED_FIELD_NUMBER: _ClassVar[int]
    name: str
    migration: str
    migrations_started: int
    migrations_completed: int
    migrations_live: int
    migrations_recompute: int
    migrations_refused: int
    migrations_gone: int
    migrations_failed: int
    migrations_in_flight: int
    kv_pages_copied: int
    pause_seconds: float
    ms_per_decision: float
    refinements: int
    replans: int
    migrations_timed_out: int
    replicas_lost: int
    replicas_rejoined: int
    requests_resumed: int
    requests_failed: int
    def __init__(self, name: _Optional[str] = ..., migration: _Optional[str] = ..., migrations_started: _Optional[int] = ..., migrations_completed: _Optional[int] = ..., migrations_live: _Optional[int] = ..., migrations_recompute: _Optional[int] = ..., migrations_refused: _Optional[int] = ..., migrations_gone: _Optional[int] = ..., migrations_failed: _Optional[int] = ..., migrations_in_flight: _Optional[int] = ..., kv_pages_copied: _Optional[int] = ..., pause_seconds: _Optional[float] = ..., ms_per_decision: _Optional[float] = ..., refinements: _Optional[int] = ..., replans: _Optional[int] = ..., migrations_timed_out: _Optional[int] = ..., replicas_lost: _Optional[int] = ..., replicas_rejoined: _Optional[int] = ..., requests_resumed: _Optional[int] = ..., requests_failed: _Optional[int] = ...) -> None: ...

class StatsResponse(_message.Message):
    __slots__ = ("model", "draining", "engine_alive", "requests_in_flight", "replica_groups", "total", "uptime_seconds", "router", "replicas")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    DRAINING_FIELD_NUMBER: _ClassVar[int]
    ENGINE_ALIVE_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    REPLICA_GROUPS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    UPTIME_SECONDS_FIELD_NUMBER: _ClassVar[int]
    ROUTER_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    model: str
    draining: bool
    engine_alive: bool
    requests_in_flight: int
    replica_groups: _containers.RepeatedCompositeFieldContainer[ReplicaGroupStats]
    total: EngineStats
    uptime_seconds: float
    router: RouterStats
    replicas: _containers.RepeatedCompositeFieldContainer[EngineStats]
    def __init__(self, model: _Optional[str] = ..., draining: _Optional[bool] = ..., engine_alive: _Optional[bool] = ..., requests_in_flight: _Optional[int] = ..., replica_groups: _Optional[_Iterable[_Union[ReplicaGroupStats, _Mapping]]] = ..., total: _Optional[_Union[EngineStats, _Mapping]] = ..., uptime_seconds: _Optional[float] = ..., router: _Optional[_Union[RouterStats, _Mapping]] = ..., replicas: _Optional[_Iterable[_Union[EngineStats, _Mapping]]] = ...) -> None: ...

class CaptureProfileRequest(_message.Message):
    __slots__ = ("duration_ms", "log_dir")
    DURATION_MS_FIELD_NUMBER: _ClassVar[int]
    LOG_DIR_FIELD_NUMBER: _ClassVar[int]
    duration_ms: int
    log_dir: str
    def __init__(self, duration_ms: _Optional[int] = ..., log_dir: _Optional[str] = ...) -> None: ...

class CaptureProfileResponse(_message.Message):
    __slots__ = ("log_dir", "seconds")
    LOG_DIR_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    log_dir: str
    seconds: float
    def __init__(self, log_dir: _Optional[str] = ..., seconds: _Optional[float] = ...) -> None: ...

class DrainRequest(_message.Message):
    __slots__ = ("timeout_seconds", "cancel_remaining")
    TIMEOUT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    CANCEL_REMAINING_FIELD_NUMBER: _ClassVar[int]
    timeout_seconds: float
    cancel_remaining: bool
    def __init__(self, timeout_seconds: _Optional[float] = ..., cancel_remaining: _Optional[bool] = ...) -> None: ...

class DrainResponse(_message.Message):
    __slots__ = ("finished", "cancelled", "remaining")
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    CANCELLED_FIELD_NUMBER: _ClassVar[int]
    REMAINING_FIELD_NUMBER: _ClassVar[int]
    finished: int
    cancelled: int
    remaining: int
    def __init__(self, finished: _Optional[int] = ..., cancelled: _Optional[int] = ..., remaining: _Optional[int] = ...) -> None: ...

class ResumeRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ResumeResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class SetStageRangesRequest(_message.Message):
    __slots__ = ("boundaries", "replicas_per_stage")
    BOUNDARIES_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_PER_STAGE_FIELD_NUMBER: _ClassVar[int]
    boundaries: _containers.RepeatedScalarFieldContainer[int]
    replicas_per_stage: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, boundaries: _Optional[_Iterable[int]] = ..., replicas_per_stage: _Optional[_Iterable[int]] = ...) -> None: ...

class SetStageRangesResponse(_message.Message):
    __slots__ = ("replica_groups",)
    REPLICA_GROUPS_FIELD_NUMBER: _ClassVar[int]
    replica_groups: _containers.RepeatedCompositeFieldContainer[ReplicaGroupStats]
    def __init__(self, replica_groups: _Optional[_Iterable[_Union[ReplicaGroupStats, _Mapping]]] = ...) -> None: ...
