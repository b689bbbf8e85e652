"""Benchmark data: the shared data folder of a repository checkout when present (``$JAXINFER_SHARED``,
else ``shared/`` beside the checkout), otherwise what every install has: small prompt sets shipped
with jaxinfer (``data/builtin_prompts.json``) and the package's own source text. Each loader says
which source it used, so benchmark results can be labelled with it."""

from __future__ import annotations

import dataclasses
import gzip
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent
BUILTIN_PROMPTS = PACKAGE / "data" / "builtin_prompts.json"
BUILTIN = "builtin"
# prompt set -> (file under data/prompts, its prompt field)
PROMPT_FILES: dict[str, tuple[str, Callable[[dict], str]]] = {
    "mt_bench": ("mt_bench_question.jsonl", lambda row: row["turns"][0]),
    "gsm8k": ("gsm8k_test.jsonl", lambda row: row["question"]),
    "humaneval": ("HumanEval.jsonl.gz", lambda row: row["prompt"]),
}
ESSAYS = ("longtext", "PaulGrahamEssays")
BOOKS = ("pg11_Alices_Adventures_in_Wonderland.txt", "pg43_Dr_Jekyll_and_Mr_Hyde.txt")
TRACES = {"azure_conv": "AzureLLMInferenceTrace_conv.csv", "azure_code": "AzureLLMInferenceTrace_code.csv",
          "mooncake_conversation": "mooncake_conversation_trace.jsonl",
          "mooncake_synthetic": "mooncake_synthetic_trace.jsonl"}


def shared_root() -> Path:
    """Where the shared data folder is looked for (it may not exist)."""
    configured = os.environ.get("JAXINFER_SHARED")
    return Path(configured) if configured else PACKAGE.parent.parent / "shared"


def shared_file(*parts: str) -> Path | None:
    """``shared_root()/data/<parts>`` when it exists, else None."""
    path = shared_root().joinpath("data", *parts)
    return path if path.exists() else None


def _note(message: str) -> None:
    print(f"note: {message}", file=sys.stderr, flush=True)


@dataclasses.dataclass(frozen=True)
class PromptSet:
    name: str
    source: str  # the file read, or "builtin"
    prompts: list[str]

    @property
    def builtin(self) -> bool:
        return self.source == BUILTIN


def prompt_set(name: str, start: int = 0, count: int | None = None) -> PromptSet:
    """Prompts ``start .. start+count`` of a set (mt_bench, gsm8k, humaneval): the shared file's, else
    the shipped stand-ins (where ``start`` is ignored: they are few and used by no training)."""
    if name not in PROMPT_FILES:
        raise ValueError(f"unknown prompt set {name!r} (known: {', '.join(PROMPT_FILES)})")
    filename, field = PROMPT_FILES[name]
    path = shared_file("prompts", filename)
    if path is not None:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rt", encoding="utf-8") as handle:
            prompts = [field(json.loads(line)) for line in handle if line.strip()]
        source = str(path)
    else:
        _note(f"no {filename} under {shared_root() / 'data' / 'prompts'} (set JAXINFER_SHARED); "
              f"using jaxinfer's builtin {name} stand-ins")
        prompts, source, start = json.loads(BUILTIN_PROMPTS.read_text(encoding="utf-8"))[name], BUILTIN, 0
    end = None if count is None else start + count
    return PromptSet(name, source, prompts[start:end])


def long_texts() -> tuple[list[str], str]:
    """(documents, source) for long-context work: the essays then the two books of the shared folder
    (Project Gutenberg marker lines dropped), else jaxinfer's own source files."""
    essays = shared_file(*ESSAYS)
    books = [shared_file("longtext", name) for name in BOOKS]
    if essays is not None and all(books):
        texts = [p.read_text(encoding="utf-8", errors="replace").strip()
                 for p in sorted(essays.glob("*.txt")) if p.name != "rss.txt"]  # rss.txt is a stub
        for path in books:
            lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
            texts.append("\n".join(line for line in lines if not line.startswith("*** ")).strip())
        return texts, str(essays.parent)
    _note(f"no long texts under {shared_root() / 'data' / 'longtext'} (set JAXINFER_SHARED); "
          "using jaxinfer's own source files as text")
    return [p.read_text(encoding="utf-8") for p in sorted(PACKAGE.rglob("*.py"))], "jaxinfer sources"


def trace_file(name: str) -> Path:
    """A request trace of the shared folder; FileNotFoundError naming what is missing otherwise."""
    if name not in TRACES:
        raise ValueError(f"unknown trace {name!r} (known: {', '.join(TRACES)})")
    path = shared_file("traces", TRACES[name])
    if path is None:
        raise FileNotFoundError(f"trace {TRACES[name]} not found under {shared_root() / 'data' / 'traces'}: "
                                "set JAXINFER_SHARED to the folder holding data/traces")
    return path
