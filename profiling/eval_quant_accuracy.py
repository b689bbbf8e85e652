"""Accuracy of the quantized weight formats against the float32 path, on text no setting was tuned on.

    python profiling/eval_quant_accuracy.py [--model smollm2-135m] [--windows 6] [--window 512] [--out FILE]

The float32 model (the source's weights dequantized) is the reference. Each format runs the same
windows of text (non-overlapping windows of ``--window`` tokens spread evenly over two public-domain
books: Alice's Adventures in Wonderland and Dr Jekyll and Mr Hyde, from the shared data folder, or the
package's own chat template and docstrings when that folder is absent) through one jitted prefill of
the model's own modules. Per format: perplexity of the text and its change against float32, top-1
agreement with float32 and the mean KL divergence KL(float32 || format) over every position.

Formats: the source's own blocks (a GGUF's Q4_1 layers and Q8_0 embedding for the embedded model) and
q8_0 / q4_0, each with int8 activations (the CPU kernels' fast path, as llama.cpp computes) and with
float32 activations (weight-only). Prints a table; writes JSON (default
profiling/results/quant_accuracy.json).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer.datasets import BOOKS, long_texts, shared_file
from jaxinfer.layers import quant
from jaxinfer.layers.attention import RaggedMeta
from jaxinfer.layers.kv_pages import KVPages
from jaxinfer.layers.linear import QuantSpec
from jaxinfer.loader import DEFAULT_MODEL, GGUFFile, resolve_source
from jaxinfer.models import model_from_tensors

ROOT = Path(__file__).resolve().parent.parent
PAGE = 16


def text_tokens(tokenizer) -> list[int]:
    """The two books of the shared data folder, else jaxinfer's own sources (datasets.long_texts)."""
    files = [shared_file("longtext", name) for name in BOOKS]
    if all(files):
        return tokenizer.encode("\n\n".join(f.read_text() for f in files))
    return tokenizer.encode("\n\n".join(long_texts()[0]))


def windows(tokens: list[int], count: int, length: int) -> list[list[int]]:
    if len(tokens) < count * length:
        raise ValueError(f"the text has {len(tokens)} tokens; {count} windows of {length} need more")
    starts = np.linspace(0, len(tokens) - length, count).astype(int)
    return [tokens[s:s + length] for s in starts]


def prefill_logits(model, config, tokens: list[int]) -> np.ndarray:
    """Float32 logits [T, V] of every position of one prompt, in one jitted call."""
    n = len(tokens)
    pages = -(-n // PAGE)
    kv = KVPages.init(config, pages, PAGE, model.dtype)
    meta = RaggedMeta.prompts(np.arange(n, dtype=np.int32), np.array([n], np.int32),
                              np.arange(pages, dtype=np.int32)[None], np.array([0, n], np.int32),
                              prefill_kv_tokens=pages * PAGE)
    run = jax.jit(lambda m, t, kv, meta: m(t, jnp.arange(n, dtype=jnp.int32), kv, meta,
                                           jnp.arange(n, dtype=jnp.int32))[0])
    return np.asarray(run(model, jnp.asarray(tokens, jnp.int32), kv, meta))


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def formats(source) -> dict[str, QuantSpec | None]:
    own = {}
    if isinstance(source, GGUFFile):
        types = [t for t in source.block_types() if t in quant.QTYPES]
        embed = source.embedding_type()
        if types:
            own = {f"{types[0]} (file)": QuantSpec(types[0], embed if embed in quant.QTYPES else "q8_0")}
    result: dict[str, QuantSpec | None] = {"float32": None}
    for name, spec in {**own, "q8_0": QuantSpec("q8_0", "q8_0"), "q4_0": QuantSpec("q4_0", "q8_0")}.items():
        for activations in ("int8", "float32"):
            result[f"{name}, {activations} act"] = QuantSpec(spec.linear, spec.embed, activations)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--windows", type=int, default=6)
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--out", default=str(ROOT / "profiling" / "results" / "quant_accuracy.json"))
    args = parser.parse_args()
    source = resolve_source(args.model)
    texts = windows(text_tokens(source.tokenizer()), args.windows, args.window)
    reference: list[np.ndarray] = []
    rows = {}
    for name, spec in formats(source).items():
        model = model_from_tensors(source.config, source.tensors(keep_blocks=spec is not None), jnp.float32, spec)
        nll, agree, kl, count = 0.0, 0, 0.0, 0
        for index, tokens in enumerate(texts):
            logp = log_softmax(prefill_logits(model, source.config, tokens).astype(np.float64))
            if spec is None:
                reference.append(logp)
            ref = reference[index]
            nll -= logp[np.arange(len(tokens) - 1), tokens[1:]].sum()
            agree += int((logp.argmax(-1) == ref.argmax(-1)).sum())
            kl += float((np.exp(ref) * (ref - logp)).sum())
            count += len(tokens)
        ppl = float(np.exp(nll / (count - len(texts))))
        rows[name] = dict(perplexity=ppl, top1_agreement=agree / count, mean_kl=kl / count, positions=count)
        print(f"{name}: ppl {ppl:.3f}", file=sys.stderr, flush=True)
    base = rows["float32"]["perplexity"]
    print(f"{'format':28} {'perplexity':>10} {'vs f32':>8} {'top-1 agree':>12} {'mean KL':>9}")
    for name, row in rows.items():
        row["perplexity_change"] = row["perplexity"] / base - 1
        print(f"{name:28} {row['perplexity']:>10.3f} {100 * row['perplexity_change']:>+7.2f}% "
              f"{100 * row['top1_agreement']:>11.2f}% {row['mean_kl']:>9.5f}")
    record = dict(model=args.model, windows=args.windows, window=args.window, positions=rows["float32"]["positions"],
                  machine=platform.processor() or platform.machine(), jax=jax.__version__,
                  date=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"), formats=rows)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
