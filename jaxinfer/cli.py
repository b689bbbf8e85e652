"""Command-line plumbing shared by the entry points: flags generated from config dataclasses and
one-line errors with exit code 2 instead of tracebacks.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from collections.abc import Callable, Sequence

# Errors a user can cause (bad model path, bad parameters); anything else is a bug and keeps its traceback.
USER_ERRORS = (ValueError, OSError, RuntimeError)  # OSError: missing files, busy ports, permissions


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """``--model`` and ``--dtype``, shared by every entry point that loads a model."""
    from jaxinfer.loader import DEFAULT_MODEL, DTYPE_HELP, DTYPES

    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help="embedded model name, .gguf file, Hugging Face directory or jaxinfer checkpoint")
    parser.add_argument("--dtype", default="auto", choices=list(DTYPES), help=DTYPE_HELP)


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """One ``--field-name`` flag per dataclass field, typed and documented from the field."""
    for field in dataclasses.fields(cls):
        flag = "--" + field.name.replace("_", "-")
        help_text = field.metadata.get("help", "")
        if field.type in (bool, "bool"):
            parser.add_argument(flag, dest=field.name, action=argparse.BooleanOptionalAction, default=field.default,
                                help=help_text)
        elif "item_type" in field.metadata:
            parser.add_argument(flag, dest=field.name, type=field.metadata["item_type"], action="append",
                                default=[], help=help_text)
        elif isinstance(field.default, tuple) or dataclasses.is_dataclass(field.default):
            continue  # structured fields (bucket sets, nested configs) are set from code or a config file
        else:
            kind = field.metadata.get("type", type(field.default))
            parser.add_argument(flag, dest=field.name, type=kind, default=field.default,
                                help=f"{help_text} (default: {field.default})".strip())


def dataclass_from_args(cls: type, args: argparse.Namespace):
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
    return cls(**{name: tuple(v) if isinstance(v, list) else v for name, v in values.items()})


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
