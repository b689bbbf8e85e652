"""Command-line plumbing shared by the entry points: the model flags and one-line errors with exit
code 2 instead of tracebacks (flags generated from config dataclasses: jaxinfer.config_tree).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence

# Errors a user can cause (bad model path, bad parameters); anything else is a bug and keeps its traceback.
USER_ERRORS = (ValueError, OSError, RuntimeError)  # OSError: missing files, busy ports, permissions


class ArgumentParser(argparse.ArgumentParser):
    """An argparse parser whose errors are one line (``error: ...``, exit code 2) without the usage
    dump: a bad flag is named the way every other user error is."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """``--model`` and ``--dtype``, shared by every entry point that loads a model."""
    from jaxinfer.config import DEFAULT_MODEL, DTYPE_HELP, WEIGHT_DTYPES

    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help="embedded model name, .gguf file, Hugging Face directory or jaxinfer checkpoint")
    parser.add_argument("--dtype", default="auto", choices=list(WEIGHT_DTYPES), help=DTYPE_HELP)


def run_main(main: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None = None) -> None:
    """Run ``main``; user errors print ``error: ...`` on one stderr line and exit 2."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        code = main(argv)
    except USER_ERRORS as exc:
        message = " ".join(str(exc).split()) or type(exc).__name__
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code)
