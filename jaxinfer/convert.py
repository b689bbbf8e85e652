"""``python -m jaxinfer.convert --model M --out DIR``: write a jaxinfer checkpoint (orbax) for fast reload."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

from jaxinfer.cli import add_model_arguments, run_main
from jaxinfer.loader import load_model
from jaxinfer.loader.checkpoint import save_checkpoint


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jaxinfer.convert", description=__doc__)
    add_model_arguments(parser)
    parser.add_argument("--out", required=True, help="output directory")
    args = parser.parse_args(argv)
    loaded = load_model(args.model, args.dtype)
    start = time.perf_counter()
    save_checkpoint(args.out, loaded.model, loaded.tokenizer, source=loaded.source, sampling=loaded.sampling_defaults)
    print(f"loaded {loaded.source} in {loaded.load_seconds:.2f} s; wrote {args.out} in "
          f"{time.perf_counter() - start:.2f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    run_main(main)
