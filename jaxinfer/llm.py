"""Offline API: ``LLM(model).generate(prompts, SamplingParams(...))``."""

from __future__ import annotations

import dataclasses
import logging
import sys
import time
from collections.abc import Callable, Mapping
from collections.abc import Sequence as Seq
from typing import Any

from jaxinfer.compile_cache import enable_compilation_cache
from jaxinfer.config import EngineConfig
from jaxinfer.engine.engine import Engine
from jaxinfer.engine.request_output import RequestOutput
from jaxinfer.loader import load_model
from jaxinfer.sampling_params import SamplingParams
from jaxinfer.spec.draft_head import prepare_speculative

logger = logging.getLogger(__name__)


class LLM:
    """A loaded model plus its engine, warmed up so generation never waits on a compile.

    ``model``: an embedded name (default ``smollm2-135m``), a ``.gguf`` file, a Hugging Face
    directory or a jaxinfer checkpoint directory.
    """

    def __init__(self, model: str = "smollm2-135m", *, dtype: str = "auto",
                 config: EngineConfig | None = None, warm_up: bool = True, show_progress: bool = False):
        enable_compilation_cache()
        self.loaded = load_model(model, dtype)
        self.tokenizer = self.loaded.tokenizer
        config = config or EngineConfig()
        speculative, draft_head = prepare_speculative(config.speculative, model)
        self.engine = Engine(self.loaded.model, self.tokenizer, dataclasses.replace(config, speculative=speculative),
                             draft_head=draft_head)
        self.warm_up_seconds = 0.0
        if warm_up:
            start = time.perf_counter()
            self.engine.warm_up(_progress("compiling step shapes") if show_progress else None)
            self.warm_up_seconds = time.perf_counter() - start

    def generate(self, prompts: str | Seq[int] | Seq[str | Seq[int]],
                 params: SamplingParams | Seq[SamplingParams] | None = None,
                 on_output: Callable[[RequestOutput], None] | None = None) -> list[RequestOutput]:
        """Generate for one prompt or a list (text or token ids); outputs in prompt order."""
        if isinstance(prompts, str) or (isinstance(prompts, Seq) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        return self.engine.generate(list(prompts), params or SamplingParams(), on_output)

    def chat(self, conversations: Seq[Seq[Mapping[str, Any]]],
             params: SamplingParams | Seq[SamplingParams] | None = None) -> list[RequestOutput]:
        """Each conversation (a list of {"role", "content"} messages) through the chat template."""
        prompts = [self.tokenizer.encode_chat(messages) for messages in conversations]
        return self.engine.generate(prompts, params or SamplingParams())


def _progress(label: str) -> Callable[[int, int], None]:
    def report(done: int, total: int) -> None:
        print(f"\r{label}: {done}/{total}", end="\n" if done == total else "", file=sys.stderr, flush=True)
    return report
