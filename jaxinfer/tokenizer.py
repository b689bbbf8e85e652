"""Tokenizer: Hugging Face ``tokenizers`` byte-level BPE built from GGUF metadata or tokenizer.json,
plus the model's chat template rendered with jinja2.
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jinja2
import jinja2.sandbox
import tokenizers
from tokenizers import AddedToken, decoders, models, pre_tokenizers, processors

# Split patterns of the byte-level BPE pre-tokenizers that GGUF files name in tokenizer.ggml.pre.
_LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
                   r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"
                  r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def _pre_tokenizer(pre: str) -> pre_tokenizers.PreTokenizer:
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in ("default", "gpt-2", "gpt2"):
        return byte_level
    if pre in ("smollm", "starcoder", "refact"):
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    pattern = {"llama-bpe": _LLAMA3_PATTERN, "llama3": _LLAMA3_PATTERN, "qwen2": _QWEN2_PATTERN}.get(pre)
    if pattern is None:
        raise ValueError(f"unsupported GGUF pre-tokenizer {pre!r} "
                         "(supported: gpt-2, smollm, starcoder, llama-bpe, qwen2)")
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(tokenizers.Regex(pattern), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])


class Tokenizer:
    """Text <-> token ids, special ids, and chat-template rendering."""

    def __init__(self, backend: tokenizers.Tokenizer, *, eos_ids: Sequence[int], bos_id: int | None,
                 chat_template: str | None):
        if not eos_ids:
            raise ValueError("tokenizer has no end-of-sequence token id")
        self.backend = backend
        self.eos_ids = tuple(int(i) for i in eos_ids)
        self.bos_id = bos_id
        self.chat_template = chat_template
        self._template: jinja2.Template | None = None

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: Sequence[Mapping[str, Any]], *,
                            add_generation_prompt: bool = True) -> str:
        """Render chat ``messages`` ([{"role": ..., "content": ...}]) with the model's template."""
        if not self.chat_template:
            raise ValueError("this model has no chat template")
        for i, message in enumerate(messages):
            if not isinstance(message, Mapping) or not isinstance(message.get("role"), str) \
                    or not isinstance(message.get("content"), str):
                raise ValueError(f"chat message {i} must have string 'role' and 'content'")
        if self._template is None:
            env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            env.globals["raise_exception"] = _raise_template_error
            env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
            self._template = env.from_string(self.chat_template)
        return self._template.render(
            messages=list(messages), add_generation_prompt=add_generation_prompt,
            bos_token=self._special_text(self.bos_id), eos_token=self._special_text(self.eos_ids[0]),
        )

    def encode_chat(self, messages: Sequence[Mapping[str, Any]]) -> list[int]:
        # The rendered template already carries every special token it wants.
        return self.encode(self.apply_chat_template(messages), add_special_tokens=False)

    def _special_text(self, token_id: int | None) -> str:
        return "" if token_id is None else (self.backend.id_to_token(token_id) or "")

    # -- construction -------------------------------------------------------------------------

    @classmethod
    def from_gguf(cls, meta: Mapping[str, Any]) -> Tokenizer:
        """Build from GGUF ``tokenizer.ggml.*`` metadata (byte-level BPE, model "gpt2")."""
        kind = meta.get("tokenizer.ggml.model")
        if kind != "gpt2":
            raise ValueError(f"unsupported GGUF tokenizer model {kind!r} (supported: gpt2 byte-level BPE)")
        tokens = list(meta["tokenizer.ggml.tokens"])
        merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
        types = list(meta.get("tokenizer.ggml.token_type") or [1] * len(tokens))
        vocab = {tok: i for i, tok in enumerate(tokens)}
        backend = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False,
                                                  byte_fallback=False))
        backend.pre_tokenizer = _pre_tokenizer(str(meta.get("tokenizer.ggml.pre", "default")))
        backend.decoder = decoders.ByteLevel()
        # Control (3) and user-defined (4) tokens are matched whole in text, before BPE.
        backend.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False)
                                    for i, t in enumerate(types) if t == 3])
        backend.add_tokens([AddedToken(tokens[i], special=False, normalized=False)
                            for i, t in enumerate(types) if t == 4])
        bos = meta.get("tokenizer.ggml.bos_token_id")
        bos = None if bos is None else int(bos)
        if meta.get("tokenizer.ggml.add_bos_token", False) and bos is not None:
            bos_text = tokens[bos]
            backend.post_processor = processors.TemplateProcessing(
                single=f"{bos_text} $A", pair=f"{bos_text} $A {bos_text} $B", special_tokens=[(bos_text, bos)])
        eos_ids = [int(meta[k]) for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id")
                   if meta.get(k) is not None]
        return cls(backend, eos_ids=list(dict.fromkeys(eos_ids)), bos_id=bos,
                   chat_template=meta.get("tokenizer.chat_template"))

    @classmethod
    def from_dir(cls, directory: str | Path, *, eos_ids: Sequence[int] = ()) -> Tokenizer:
        """Load ``tokenizer.json`` plus ``tokenizer_config.json`` (chat template, bos/eos)."""
        directory = Path(directory)
        path = directory / "tokenizer.json"
        if not path.is_file():
            raise ValueError(f"{directory} has no tokenizer.json")
        try:
            backend = tokenizers.Tokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers raises a bare Exception on bad JSON
            raise ValueError(f"cannot read {path}: {exc}") from None
        config = _read_json(directory / "tokenizer_config.json")
        template = config.get("chat_template")
        if isinstance(template, list):  # named templates: take the default one
            template = next((t["template"] for t in template if t.get("name") == "default"), None)

        def token_id(value: Any) -> int | None:
            if isinstance(value, Mapping):
                value = value.get("content")
            return backend.token_to_id(value) if isinstance(value, str) else None

        ids = (list(eos_ids) or config.get("eos_token_ids")
               or [i for i in [token_id(config.get("eos_token"))] if i is not None])
        return cls(backend, eos_ids=ids, bos_id=token_id(config.get("bos_token")), chat_template=template)

    def save(self, directory: str | Path) -> None:
        """Write ``tokenizer.json`` and ``tokenizer_config.json`` that ``from_dir`` reads back."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(directory / "tokenizer.json"))
        config = {"chat_template": self.chat_template, "eos_token_ids": list(self.eos_ids),
                  "bos_token": self._special_text(self.bos_id) or None,
                  "eos_token": self._special_text(self.eos_ids[0])}
        (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=1))


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot parse {path}: {exc}") from None


def _raise_template_error(message: str) -> None:
    raise ValueError(f"chat template error: {message}")
