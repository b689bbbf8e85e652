"""Frozen configuration dataclasses, one per concern, and the choice lists beside them (host only).

Every config is hashable (frozen, slots) so it can be a static argument of a jitted function.
Change one with ``dataclasses.replace``. The serve CLI flags and TOML keys are generated from the
tree of these dataclasses (jaxinfer.config_tree): a field's metadata gives its help text, its
choices and, where one exists, a shorter flag.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from jaxinfer.buckets import geometric

DEFAULT_MODEL = "smollm2-135m"  # the embedded model (jaxinfer.loader.embedded)
# weight dtypes a model loads as: float weights, GGUF-style blocks (CPU kernels; dequantize + dot
# elsewhere), or "auto": the source's own blocks (a GGUF) or q8_0 on a CPU with the kernels, float elsewhere
WEIGHT_DTYPES = ("float32", "bfloat16", "q8_0", "q4_1", "q4_0", "auto")
DTYPE_HELP = ("weights: float32, bfloat16, q8_0, q4_1, q4_0 (GGUF blocks run by the CPU kernels) or auto (a GGUF's own "
              "blocks, q8_0 otherwise, on a CPU with the kernels; float elsewhere)")
ATTENTION_IMPLS = ("auto", "pallas", "reference")

# Architectures of the Llama family this engine runs, by their Hugging Face and GGUF names.
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "qwen2",
}


@dataclass(frozen=True, slots=True)
class RopeScaling:
    """Llama-3 style frequency scaling of rotary embeddings ("rope_type": "llama3")."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position: int

    def __post_init__(self) -> None:
        if self.factor < 1.0 or self.low_freq_factor <= 0 or self.high_freq_factor <= self.low_freq_factor:
            raise ValueError(
                f"invalid llama3 rope scaling: factor={self.factor}, low_freq_factor="
                f"{self.low_freq_factor}, high_freq_factor={self.high_freq_factor}"
            )
        if self.original_max_position < 1:
            raise ValueError(f"invalid rope original_max_position={self.original_max_position}")


@dataclass(frozen=True, slots=True)
class ModelConfig:
    """Architecture of a Llama-family decoder (Llama 2/3, SmolLM, Mistral without sliding window, Qwen2)."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float
    rms_norm_eps: float
    max_position: int
    tie_word_embeddings: bool
    attention_bias: bool = False
    rope_scaling: RopeScaling | None = None

    def __post_init__(self) -> None:
        if self.architecture not in ("llama", "qwen2"):
            raise ValueError(f"unsupported architecture {self.architecture!r} (supported: llama, qwen2)")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "head_dim", "max_position"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"model config {name}={value!r} must be a positive integer")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for rotary embeddings")
        if self.rope_theta <= 0 or self.rms_norm_eps <= 0:
            raise ValueError(f"rope_theta={self.rope_theta} and rms_norm_eps={self.rms_norm_eps} must be > 0")

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any]) -> ModelConfig:
        """Build from a Hugging Face ``config.json`` dictionary."""
        archs = hf.get("architectures") or [hf.get("model_type", "?")]
        arch = SUPPORTED_ARCHITECTURES.get(archs[0]) or SUPPORTED_ARCHITECTURES.get(hf.get("model_type", ""))
        if arch is None:
            raise ValueError(f"unsupported architecture {archs[0]!r} (supported: {_supported_names()})")
        if hf.get("sliding_window") and hf.get("use_sliding_window", arch == "llama"):
            raise ValueError(f"sliding-window attention (window {hf['sliding_window']}) is not supported")
        num_heads = int(hf["num_attention_heads"])
        hidden = int(hf["hidden_size"])
        return cls(
            architecture=arch,
            vocab_size=int(hf["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(hf["intermediate_size"]),
            num_layers=int(hf["num_hidden_layers"]),
            num_heads=num_heads,
            num_kv_heads=int(hf.get("num_key_value_heads") or num_heads),
            head_dim=int(hf.get("head_dim") or hidden // num_heads),
            rope_theta=float(hf.get("rope_theta", 10000.0)),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            max_position=int(hf.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            attention_bias=bool(hf.get("attention_bias", arch == "qwen2")),
            rope_scaling=_rope_scaling_from_hf(hf.get("rope_scaling")),
        )

    @classmethod
    def from_gguf(cls, meta: Mapping[str, Any], *, has_output_tensor: bool) -> ModelConfig:
        """Build from GGUF metadata (``general.architecture`` and ``{arch}.*`` keys)."""
        gguf_arch = meta.get("general.architecture")
        arch = SUPPORTED_ARCHITECTURES.get(str(gguf_arch))
        if arch is None:
            raise ValueError(f"unsupported architecture {gguf_arch!r} (supported: {_supported_names()})")

        def key(name: str, default: Any = None) -> Any:
            value = meta.get(f"{gguf_arch}.{name}", default)
            if value is None:
                raise ValueError(f"GGUF metadata lacks {gguf_arch}.{name}")
            return value

        hidden = int(key("embedding_length"))
        num_heads = int(key("attention.head_count"))
        vocab = meta.get(f"{gguf_arch}.vocab_size") or len(meta.get("tokenizer.ggml.tokens") or [])
        scaling = None
        if meta.get(f"{gguf_arch}.rope.scaling.type") not in (None, "none"):
            raise ValueError(f"unsupported rope scaling {meta[f'{gguf_arch}.rope.scaling.type']!r}")
        return cls(
            architecture=arch,
            vocab_size=int(vocab),
            hidden_size=hidden,
            intermediate_size=int(key("feed_forward_length")),
            num_layers=int(key("block_count")),
            num_heads=num_heads,
            num_kv_heads=int(key("attention.head_count_kv", num_heads)),
            head_dim=int(meta.get(f"{gguf_arch}.attention.key_length") or hidden // num_heads),
            rope_theta=float(key("rope.freq_base", 10000.0)),
            rms_norm_eps=float(key("attention.layer_norm_rms_epsilon", 1e-5)),
            max_position=int(key("context_length")),
            tie_word_embeddings=not has_output_tensor,
            attention_bias=arch == "qwen2",
            rope_scaling=scaling,
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelConfig:
        fields = dict(data)
        if fields.get("rope_scaling") is not None:
            fields["rope_scaling"] = RopeScaling(**fields["rope_scaling"])
        return cls(**fields)


def _supported_names() -> str:
    return ", ".join(sorted(name for name in SUPPORTED_ARCHITECTURES if name[0].isupper()))


def _rope_scaling_from_hf(scaling: Mapping[str, Any] | None) -> RopeScaling | None:
    if not scaling:
        return None
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind in ("default", None):
        return None
    if kind != "llama3":
        raise ValueError(f"unsupported rope scaling type {kind!r} (supported: llama3)")
    return RopeScaling(
        factor=float(scaling["factor"]),
        low_freq_factor=float(scaling["low_freq_factor"]),
        high_freq_factor=float(scaling["high_freq_factor"]),
        original_max_position=int(scaling["original_max_position_embeddings"]),
    )


@dataclass(frozen=True, slots=True)
class CacheConfig:
    """Paged KV cache: pages of ``page_size`` token slots shared by all requests."""

    page_size: int = dataclasses.field(default=16, metadata={"help": "token slots per KV page"})
    num_pages: int = dataclasses.field(default=0, metadata={"help": "KV pages in the pool (0 = from --kv-memory-gib)"})
    kv_memory_gib: float = dataclasses.field(default=2.0, metadata={"help": "KV pool size when num_pages is 0"})
    enable_prefix_caching: bool = dataclasses.field(default=True, metadata={"help": "reuse KV of repeated prefixes"})

    def __post_init__(self) -> None:
        if not isinstance(self.page_size, int) or self.page_size < 1 or self.page_size & (self.page_size - 1):
            raise ValueError(f"page_size must be a power of two >= 1, got {self.page_size!r}")
        if not isinstance(self.num_pages, int) or self.num_pages < 0:
            raise ValueError(f"num_pages must be an integer >= 0, got {self.num_pages!r}")
        if not self.kv_memory_gib > 0:
            raise ValueError(f"kv_memory_gib must be > 0, got {self.kv_memory_gib!r}")

    def resolve_num_pages(self, bytes_per_page: int) -> int:
        return self.num_pages or max(1, int(self.kv_memory_gib * 2**30) // bytes_per_page)


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    """Continuous batching: budgets per step and the shape buckets every step is padded to.

    A step holds up to ``max_num_batched_tokens`` tokens: one per decoding request plus prompt chunks.
    While only decodes run and nothing waits that could be admitted, one device call runs up to
    ``decode_steps`` steps (a burst: each row feeds its sampled token back on the device and stops
    there at a stop token or its length budget), so the host is not between every two steps.
    Bucket tuples left empty are derived: decode rows 1, 8, 64, ... up to max_num_seqs; prompt
    tokens 64, 128, 256, ... up to the token budget; KV lengths 256, 1024, ... up to max_model_len; the
    prompt part of mixed (prompt + decode) steps uses the coarser mixed_kv_buckets (the second KV
    bucket and max_model_len), which keeps the number of compiled step shapes in the dozens. Steps
    that only decode, the most frequent kind, pad their KV length to the finer decode_kv_buckets
    (256, 512, 1024, ...; the kv_buckets when those are given), since attention over padded KV slots
    dominates their cost.
    """

    max_num_seqs: int = dataclasses.field(default=32, metadata={"help": "running requests at most"})
    max_num_batched_tokens: int = dataclasses.field(default=256, metadata={"help": "tokens per step at most"})
    max_model_len: int = dataclasses.field(default=0, metadata={"help": "context limit (0 = the model's)"})
    max_waiting: int = dataclasses.field(default=1024, metadata={"help": "queued requests at most; more are refused"})
    max_prefill_seqs: int = dataclasses.field(default=8, metadata={"help": "requests with prompt chunks per step"})
    enable_chunked_prefill: bool = dataclasses.field(default=True, metadata={"help": "split long prompts"})
    decode_steps: int = dataclasses.field(default=4, metadata={
        "help": "decode steps per device call while only decodes run (sampling and stop checks on the device; 1: "
                "one step per call)"})
    decode_buckets: tuple[int, ...] = dataclasses.field(default=(), metadata={
        "help": "decode row counts steps pad to (none: 1, 8, 64, ... up to max_num_seqs)"})
    prefill_buckets: tuple[int, ...] = dataclasses.field(default=(), metadata={
        "help": "prompt token counts steps pad to (none: 64, 128, 256, ... up to the token budget)"})
    kv_buckets: tuple[int, ...] = dataclasses.field(default=(), metadata={
        "help": "KV lengths prompt steps pad to (none: 256, 1024, ... up to max_model_len)"})
    mixed_kv_buckets: tuple[int, ...] = dataclasses.field(default=(), metadata={
        "help": "KV lengths the prompt part of mixed steps pads to (none: the second KV bucket and max_model_len)"})
    decode_kv_buckets: tuple[int, ...] = dataclasses.field(default=(), metadata={
        "help": "KV lengths decode-only steps pad to (none: 256, 512, 1024, ...; the kv_buckets when given)"})

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_waiting", "max_prefill_seqs", "decode_steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if not isinstance(self.max_model_len, int) or self.max_model_len < 0:
            raise ValueError(f"max_model_len must be an integer >= 0, got {self.max_model_len!r}")
        for name in ("decode_buckets", "prefill_buckets", "kv_buckets", "mixed_kv_buckets", "decode_kv_buckets"):
            buckets = getattr(self, name)
            if any(not isinstance(b, int) or b < 1 for b in buckets) or list(buckets) != sorted(set(buckets)):
                raise ValueError(f"{name} must be increasing positive integers, got {buckets!r}")
        if self.decode_buckets and self.decode_buckets[-1] < self.max_num_seqs:
            raise ValueError(f"largest decode bucket {self.decode_buckets[-1]} < max_num_seqs {self.max_num_seqs}")
        if self.prefill_buckets and self.prefill_buckets[-1] < self.max_num_batched_tokens:
            raise ValueError(f"largest prefill bucket {self.prefill_buckets[-1]} < max_num_batched_tokens "
                             f"{self.max_num_batched_tokens}")

    def resolve(self, model_max_len: int) -> SchedulerConfig:
        """Fill in max_model_len and the derived bucket sets."""
        max_len = min(self.max_model_len or model_max_len, model_max_len)
        if not self.enable_chunked_prefill and self.max_num_batched_tokens < max_len:
            raise ValueError(f"without chunked prefill max_num_batched_tokens ({self.max_num_batched_tokens}) "
                             f"must be >= max_model_len ({max_len})")
        for name in ("kv_buckets", "mixed_kv_buckets", "decode_kv_buckets"):
            buckets = getattr(self, name)
            if buckets and buckets[-1] < max_len:
                raise ValueError(f"largest {name[:-1].replace('_', ' ')} {buckets[-1]} < max_model_len {max_len}")
        kv = self.kv_buckets or geometric(256, 4, max_len)
        return dataclasses.replace(
            self, max_model_len=max_len,
            decode_buckets=self.decode_buckets or geometric(1, 8, self.max_num_seqs),
            prefill_buckets=self.prefill_buckets or geometric(64, 2, self.max_num_batched_tokens),
            kv_buckets=kv, mixed_kv_buckets=self.mixed_kv_buckets or tuple(sorted({kv[min(1, len(kv) - 1)], kv[-1]})),
            decode_kv_buckets=self.decode_kv_buckets or self.kv_buckets or geometric(256, 2, max_len))


@dataclass(frozen=True, slots=True)
class UniSparseConfig:
    """Block-sparse prefill parameters.

    The paper's defaults were not recoverable. These were chosen by measuring SmolLM2-135M's perplexity
    increase, density and attention time (profiling/eval_unisparse_accuracy.py, bench_unisparse.py;
    README): query pooling costs the most accuracy (c_q = 8: +8.3% at density 0.27 on a 4K window;
    c_q = 1: +3.7% at 0.30); a wide always-kept local window buys accuracy back cheaply (16 blocks:
    +0.6% at 0.49), more so as prompts grow; averaging the 3 query heads of a KV group before scoring
    (the paper's head-level compression; c_h = 0 pools the whole group) cuts the estimate's cost 3x
    for a little accuracy, which tau = 0.96 recovers (8K: +0.8% at density 0.36). Key pooling c_k = 8
    keeps the estimate at 1/8 of the dense logits."""

    block_size: int = dataclasses.field(default=64, metadata={"help": "tokens per query/key block"})
    c_q: int = dataclasses.field(default=1, metadata={"help": "queries pooled into one composite query"})
    c_k: int = dataclasses.field(default=8, metadata={"help": "keys pooled into one composite key"})
    c_h: int = dataclasses.field(
        default=0, metadata={"help": "query heads of a KV group averaged before scoring (0: the whole group)"})
    tau: float = dataclasses.field(default=0.96, metadata={
        "help": "UniSparse: estimated attention mass each query block keeps", "flag": "sparse-tau"})
    sink_blocks: int = dataclasses.field(default=1, metadata={"help": "leading key blocks always kept"})
    local_blocks: int = dataclasses.field(default=16, metadata={"help": "diagonal-and-before blocks always kept"})
    max_blocks: int = dataclasses.field(default=0, metadata={"help": "kept blocks per query block at most (0: no cap)"})
    share_kv_heads: bool = dataclasses.field(
        default=True, metadata={"help": "one selection per KV head from its query heads' mean scores"})

    def __post_init__(self) -> None:
        for name in ("block_size", "c_q", "c_k", "local_blocks"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        for name in ("c_q", "c_k"):
            if self.block_size % getattr(self, name):
                raise ValueError(f"{name}={getattr(self, name)} must divide block_size={self.block_size}")
        if not 0 < self.tau <= 1:
            raise ValueError(f"tau must be in (0, 1], got {self.tau!r}")
        if not isinstance(self.sink_blocks, int) or self.sink_blocks < 0:
            raise ValueError(f"sink_blocks must be an integer >= 0, got {self.sink_blocks!r}")
        if not isinstance(self.c_h, int) or self.c_h < 0:
            raise ValueError(f"c_h must be an integer >= 0, got {self.c_h!r}")
        if not isinstance(self.max_blocks, int) or self.max_blocks < 0:
            raise ValueError(f"max_blocks must be an integer >= 0, got {self.max_blocks!r}")
        if not isinstance(self.share_kv_heads, bool):
            raise ValueError(f"share_kv_heads must be a bool, got {self.share_kv_heads!r}")


SPARSE_PREFILL_MODES = ("sparse", "dense_blocked", "off")


@dataclass(frozen=True, slots=True)
class SparsePrefillConfig:
    """The blocked prefill backend for long prompts (UniSparse, arXiv 2512.14082).

    A prompt longer than ``min_len`` tokens is prefilled in steps of its own whose attention is
    UniSparse block-sparse ('sparse') or dense with the same blocking ('dense_blocked', the fair
    baseline); 'off' keeps every prompt on the paged prefill path. Decode always stays dense and paged.
    A request can opt out with SamplingParams.sparse_prefill=False.
    """

    mode: str = dataclasses.field(default="sparse", metadata={
        "help": "prefill backend for long prompts (UniSparse block-sparse, dense blocked, or off)",
        "choices": SPARSE_PREFILL_MODES, "flag": "sparse-prefill"})
    min_len: int = dataclasses.field(default=4096, metadata={
        "help": "prompts longer than this many tokens use the sparse prefill backend", "flag": "sparse-min-len"})
    unisparse: UniSparseConfig = UniSparseConfig()

    def __post_init__(self) -> None:
        if self.mode not in SPARSE_PREFILL_MODES:
            raise ValueError(f"unknown sparse prefill mode {self.mode!r} (choose {', '.join(SPARSE_PREFILL_MODES)})")
        if not isinstance(self.min_len, int) or isinstance(self.min_len, bool) or self.min_len < 0:
            raise ValueError(f"sparse prefill min_len must be an integer >= 0, got {self.min_len!r}")
        if not isinstance(self.unisparse, UniSparseConfig):
            raise ValueError(f"unisparse must be a UniSparseConfig, got {type(self.unisparse).__name__}")

    @property
    def enabled(self) -> bool:
        return self.mode != "off"


SPEC_METHODS = ("off", "ngram", "eagle", "heterospec")


DEFAULT_SPEC_DEPTH, DEFAULT_SPEC_NODES = 4, 16  # without a tuned policy


@dataclass(frozen=True, slots=True)
class SpeculativeConfig:
    """Speculative decoding (HeteroSpec, arXiv 2505.13254, on EAGLE-2 dynamic trees).

    A drafter proposes a tree of continuations per decoding request; one target step verifies every
    node (tree attention) and keeps the longest path the target agrees with, so the output is the
    target's own (greedy: token for token; sampling: the same distribution). Methods: 'ngram'
    (prompt lookup, no training), 'eagle' (the EAGLE-3-style draft head, fixed depth and budget),
    'heterospec' (the draft head with the entropy-binned depth and budget per round).
    """

    method: str = dataclasses.field(default="off", metadata={
        "help": "speculative decoding: ngram (prompt lookup), eagle (draft head, fixed tree), heterospec (draft "
                "head, entropy-adaptive tree) or off", "choices": SPEC_METHODS, "flag": "speculative"})
    draft: str = dataclasses.field(default="", metadata={
        "help": "draft head directory for eagle/heterospec ('': the head shipped for the model)", "flag": "draft"})
    top_k: int = dataclasses.field(default=4, metadata={
        "help": "tree branching: children per expanded node", "flag": "spec-top-k"})
    depth: int = dataclasses.field(default=0, metadata={
        "help": "base draft depth d (drafted tree levels); 0: the draft head's tuned policy, else 4",
        "flag": "spec-depth"})
    num_nodes: int = dataclasses.field(default=0, metadata={
        "help": "verified nodes per round incl. the root; 0: the draft head's tuned policy, else 16",
        "flag": "spec-nodes"})
    alpha: int = dataclasses.field(default=0, metadata={"help": "HeteroSpec extra depth (0 = ceil(depth/2))"})
    gamma: tuple[float, ...] = dataclasses.field(default=(0.3, 0.6, 1.0), metadata={
        "help": "HeteroSpec budget factors of the three low-entropy bins"})
    thresholds: tuple[float, ...] = dataclasses.field(default=(), metadata={
        "help": "HeteroSpec entropy bin edges s0 < s1 < s2 (none: the draft head's calibration)"})
    max_batch: int = dataclasses.field(default=4, metadata={
        "help": "speculate only while at most this many requests decode (plain decoding above)",
        "flag": "spec-max-batch"})
    ngram_max: int = dataclasses.field(default=4, metadata={"help": "longest suffix the n-gram drafter matches"})
    adaptive: bool = dataclasses.field(default=True, metadata={
        "help": "decode plainly at batch sizes where rounds measure slower than plain steps"})

    def __post_init__(self) -> None:
        if self.method not in SPEC_METHODS:
            raise ValueError(f"unknown speculative method {self.method!r} (choose {', '.join(SPEC_METHODS)})")
        for name in ("top_k", "depth", "num_nodes", "max_batch", "ngram_max"):
            value = getattr(self, name)
            least = 0 if name in ("depth", "num_nodes") else 1  # 0: the tuned policy
            if not isinstance(value, int) or isinstance(value, bool) or value < least:
                raise ValueError(f"speculative {name} must be an integer >= {least}, got {value!r}")
        if self.num_nodes == 1:
            raise ValueError("speculative num_nodes must be >= 2 (the root and one draft), got 1")
        if not isinstance(self.alpha, int) or self.alpha < 0:
            raise ValueError(f"speculative alpha must be an integer >= 0, got {self.alpha!r}")
        if len(self.gamma) != 3 or not all(0 < g <= 4 for g in self.gamma):
            raise ValueError(f"speculative gamma must be 3 factors in (0, 4], got {self.gamma!r}")
        if self.thresholds and (len(self.thresholds) != 3 or list(self.thresholds) != sorted(self.thresholds)):
            raise ValueError(f"speculative thresholds must be 3 increasing bin edges, got {self.thresholds!r}")

    @property
    def enabled(self) -> bool:
        return self.method != "off"

    def with_policy(self, depth: int = DEFAULT_SPEC_DEPTH, num_nodes: int = DEFAULT_SPEC_NODES) -> SpeculativeConfig:
        """depth and num_nodes left at 0 filled in: with a draft head's tuned policy (its calibration),
        else the defaults."""
        return dataclasses.replace(self, depth=self.depth or depth, num_nodes=self.num_nodes or num_nodes)

    @property
    def uses_draft_head(self) -> bool:
        return self.method in ("eagle", "heterospec")

    @property
    def extra_depth(self) -> int:
        """alpha: the deepest extension (bin 0 drafts alpha more levels)."""
        return self.alpha or -(-self.depth // 2)

    def variants(self) -> tuple[tuple[int, int], ...]:
        """(draft depth, verified nodes) of every round configuration: the default, then HeteroSpec's
        three low-entropy bins i = 0, 1, 2 with depth d + (alpha - i) and budget round(gamma_i N) + (alpha - i)."""
        config = self.with_policy()
        default = (config.depth, config.num_nodes)
        if self.method != "heterospec":
            return (default,)
        alpha = config.extra_depth
        bins = tuple((config.depth + alpha - i, max(2, round(g * config.num_nodes) + alpha - i))
                     for i, g in enumerate(self.gamma))
        return (default, *bins)

    def verified_depth(self) -> int:
        """The deepest path a round verifies: its variants' depths, each no deeper than its budget reaches
        (a tree of b nodes holds paths of b - 1 drafts)."""
        return max(min(depth, nodes - 1) for depth, nodes in self.variants())


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """Composes the per-concern configs of one engine (one replica)."""

    cache: CacheConfig = CacheConfig()
    scheduler: SchedulerConfig = SchedulerConfig()
    attention_impl: str = dataclasses.field(default="auto", metadata={
        "help": "attention implementation (auto: Pallas kernel on GPU/TPU, the CPU kernels on CPU)",
        "choices": ATTENTION_IMPLS})
    max_logprobs: int = dataclasses.field(default=20, metadata={"help": "largest top-logprobs count a request may ask"})
    sparse_prefill: SparsePrefillConfig = SparsePrefillConfig()
    speculative: SpeculativeConfig = SpeculativeConfig()

    def __post_init__(self) -> None:
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ValueError(f"unknown attention_impl {self.attention_impl!r} (choose {', '.join(ATTENTION_IMPLS)})")
        if not isinstance(self.max_logprobs, int) or self.max_logprobs < 0:
            raise ValueError(f"max_logprobs must be an integer >= 0, got {self.max_logprobs!r}")
