"""``python -m jaxinfer.generate``: generate text from one prompt and report prefill/decode speed."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from jaxinfer import config_tree
from jaxinfer.cli import ArgumentParser, add_model_arguments, run_main
from jaxinfer.loader import load_model
from jaxinfer.sampling_params import SamplingParams


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="python -m jaxinfer.generate", description=__doc__)
    add_model_arguments(parser)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="prompt text")
    source.add_argument("--prompt-ids", help="prompt as comma-separated token ids, e.g. 1,2,3")
    parser.add_argument("--chat", action="store_true", help="wrap --prompt as a user message in the chat template")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    config_tree.add_arguments(parser, config_tree.settings(SamplingParams), flat=[()],
                              group_titles={(): "sampling"})
    from jaxinfer.serve.config import add_speculative_arguments
    add_speculative_arguments(parser)
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
    params = config_tree.build(SamplingParams, config_tree.values_from_args(args, config_tree.settings(SamplingParams)))
    if args.chat and args.prompt is None:
        raise ValueError("--chat needs --prompt text, not --prompt-ids")
    prompt_ids = parse_prompt_ids(args.prompt_ids) if args.prompt_ids is not None else None

    from jaxinfer.compile_cache import enable_compilation_cache
    from jaxinfer.config import EngineConfig, SchedulerConfig
    from jaxinfer.engine.engine import Engine
    from jaxinfer.serve.config import speculative_from_args
    from jaxinfer.spec.draft_head import prepare_speculative

    speculative, draft_head = prepare_speculative(speculative_from_args(args), args.model)
    enable_compilation_cache()
    loaded = load_model(args.model, args.dtype)
    tokenizer = loaded.tokenizer
    prompt = prompt_ids
    if prompt is None:
        prompt = tokenizer.encode_chat([{"role": "user", "content": args.prompt}]) if args.chat else args.prompt
    # One request: a one-row decode bucket; steps compile on first use and compile time is
    # reported apart from the speeds.
    engine = Engine(loaded.model, tokenizer, EngineConfig(scheduler=SchedulerConfig(max_num_seqs=1),
                                                          speculative=speculative), draft_head=draft_head)
    runner = engine.runner
    compile_at_first_token: list[float] = []

    def on_output(output) -> None:
        if not compile_at_first_token:
            compile_at_first_token.append(runner.compile_seconds)
        if not args.json:
            sys.stdout.write(output.new_text)
            sys.stdout.flush()

    result = engine.generate([prompt], params, on_output)[0]
    if args.json:
        print(json.dumps({"prompt_ids": result.prompt_ids, "output_ids": result.output_ids,
                          "text": result.text, "finish_reason": result.finish_reason}, ensure_ascii=False))
    else:
        sys.stdout.write("\n")
    metrics = result.metrics
    prefill_seconds = metrics.first_token_time - metrics.first_scheduled_time - compile_at_first_token[0]
    decode_seconds = metrics.decode_seconds - (runner.compile_seconds - compile_at_first_token[0])
    num_prompt, decoded = len(result.prompt_ids), len(result.output_ids) - 1
    print(f"prefill: {num_prompt} tokens in {prefill_seconds:.3f} s "
          f"({num_prompt / max(prefill_seconds, 1e-9):.1f} tok/s) | "
          f"decode: {decoded} tokens in {decode_seconds:.3f} s "
          f"({decoded / max(decode_seconds, 1e-9):.1f} tok/s) | "
          f"load {loaded.load_seconds:.2f} s, compile {runner.compile_seconds:.2f} s, "
          f"finish: {result.finish_reason}", file=sys.stderr)
    if engine.spec is not None:
        stats = engine.spec.stats
        print(f"speculative ({speculative.method}): {stats.rounds} rounds, mean accepted length "
              f"{stats.mean_accepted_length:.2f}, {stats.verified_tokens} tokens verified", file=sys.stderr)
    return 0


if __name__ == "__main__":
    run_main(main)
