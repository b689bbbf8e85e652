"""``python -m jaxinfer.generate``: generate text from one prompt and report prefill/decode speed."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from jaxinfer.cli import add_dataclass_arguments, add_model_arguments, dataclass_from_args, run_main
from jaxinfer.loader import load_model
from jaxinfer.sampling_params import SamplingParams


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m jaxinfer.generate", description=__doc__)
    add_model_arguments(parser)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="prompt text")
    source.add_argument("--prompt-ids", help="prompt as comma-separated token ids, e.g. 1,2,3")
    parser.add_argument("--chat", action="store_true", help="wrap --prompt as a user message in the chat template")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    add_dataclass_arguments(parser, SamplingParams)
    return parser


def parse_prompt_ids(text: str) -> list[int]:
    try:
        ids = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"--prompt-ids must be comma-separated integers, got {text!r}") from None
    if not ids:
        raise ValueError("--prompt-ids is empty")
    return ids


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    params = dataclass_from_args(SamplingParams, args)
    if args.chat and args.prompt is None:
        raise ValueError("--chat needs --prompt text, not --prompt-ids")
    prompt_ids = parse_prompt_ids(args.prompt_ids) if args.prompt_ids is not None else None

    from jaxinfer.detokenizer import IncrementalDetokenizer
    from jaxinfer.generator import Generator

    loaded = load_model(args.model, args.dtype)
    tokenizer = loaded.tokenizer
    if prompt_ids is None:
        prompt_ids = (tokenizer.encode_chat([{"role": "user", "content": args.prompt}]) if args.chat
                      else tokenizer.encode(args.prompt))
    generator = Generator(loaded.model, tokenizer)  # generate() validates the prompt before running
    detokenizer = IncrementalDetokenizer(tokenizer)

    def stream(_row: int, ids: list[int]) -> None:
        for token in ids:
            sys.stdout.write(detokenizer.push(token))
        sys.stdout.flush()

    result = generator.generate([prompt_ids], params, on_tokens=None if args.json else stream)[0]
    if args.json:
        print(json.dumps({"prompt_ids": result.prompt_ids, "output_ids": result.output_ids,
                          "text": result.text, "finish_reason": result.finish_reason}, ensure_ascii=False))
    else:
        sys.stdout.write(detokenizer.flush() + "\n")
    decoded = len(result.output_ids) - 1
    print(f"prefill: {len(prompt_ids)} tokens in {result.prefill_seconds:.3f} s "
          f"({len(prompt_ids) / max(result.prefill_seconds, 1e-9):.1f} tok/s) | "
          f"decode: {decoded} tokens in {result.decode_seconds:.3f} s "
          f"({decoded / max(result.decode_seconds, 1e-9):.1f} tok/s) | "
          f"load {loaded.load_seconds:.2f} s, compile {generator.compile_seconds:.2f} s, "
          f"finish: {result.finish_reason}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    run_main(main)
