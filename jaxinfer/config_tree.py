"""Command-line flags and config-file keys generated from a tree of nested config dataclasses.

Every leaf field of the tree is a setting named by its path (``speculative.num_nodes``,
``sparse_prefill.unisparse.tau``): the flag is the path with dashes (``--speculative.num-nodes``),
the TOML key is the field under the table of its parent path (``[speculative] num_nodes = 8``). A
section listed as flat also takes its fields' bare names as flags (``--max-num-seqs`` for
``scheduler.max_num_seqs``), and a field may name a shorter flag in its metadata (``"flag"``). Help
text comes from the field's ``"help"`` metadata, choices from ``"choices"``, and tuple fields take a
comma-separated list. Host only: no jax.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from collections.abc import Mapping, Sequence
from typing import Any


@dataclasses.dataclass(frozen=True)
class Setting:
    """One leaf field of the tree."""

    path: tuple[str, ...]
    field: dataclasses.Field
    kind: Any  # the field's resolved type

    @property
    def name(self) -> str:
        """The path joined with dots: also the argparse dest."""
        return ".".join(self.path)


def settings(cls: type, prefix: tuple[str, ...] = ()) -> list[Setting]:
    """The leaf fields of the config dataclass ``cls`` (nested dataclass fields are walked)."""
    hints = typing.get_type_hints(cls)
    out = []
    for field in dataclasses.fields(cls):
        kind = hints[field.name]
        if dataclasses.is_dataclass(kind):
            out += settings(kind, (*prefix, field.name))
        else:
            out.append(Setting((*prefix, field.name), field, kind))
    return out


def _item_type(kind: Any) -> type:
    args = [a for a in typing.get_args(kind) if a is not Ellipsis]
    return args[0] if args else str


def _parse_list(item: type):
    def parse(text: str) -> tuple:
        try:
            return tuple(item(part) for part in text.split(",") if part.strip())
        except ValueError:
            message = f"expected a comma-separated list of {item.__name__}, got {text!r}"
            raise argparse.ArgumentTypeError(message) from None
    parse.__name__ = f"list of {item.__name__}"
    return parse


def _flags(setting: Setting, flat: bool) -> list[str]:
    dashed = [part.replace("_", "-") for part in setting.path]
    flags = []
    if "flag" in setting.field.metadata:
        flags.append("--" + setting.field.metadata["flag"])
    elif flat:
        flags.append("--" + dashed[-1])
    if len(setting.path) > 1 and not flat:
        flags.append("--" + ".".join(dashed))
    return flags or ["--" + dashed[-1]]


def add_arguments(parser: argparse.ArgumentParser, tree: Sequence[Setting], flat: Sequence[tuple[str, ...]] = (),
                  group_titles: Mapping[tuple[str, ...], str] | None = None) -> None:
    """One flag (or two: a short one and the path) per setting, typed, with help and choices; settings
    whose parent path is in ``flat`` take bare field names. Defaults are left unset (None) so that a
    config file can fill what the command line did not give."""
    groups: dict[tuple[str, ...], Any] = {}
    seen: dict[str, str] = {}
    for setting in tree:
        parent = setting.path[:-1]
        if parent not in groups:
            title = (group_titles or {}).get(parent) or ".".join(parent) or "general"
            groups[parent] = parser.add_argument_group(title)
        field, kind = setting.field, setting.kind
        flags = _flags(setting, parent in flat)
        for flag in flags:
            if flag in seen:
                raise ValueError(f"flag {flag} names both {seen[flag]} and {setting.name}")
            seen[flag] = setting.name
        default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
        help_text = field.metadata.get("help", "")
        options: dict[str, Any] = dict(dest=setting.name, default=None)
        if "item_type" in field.metadata:  # a repeatable flag
            options.update(type=field.metadata["item_type"], action="append")
        elif kind is bool:
            options.update(action=argparse.BooleanOptionalAction)
        elif typing.get_origin(kind) is tuple:
            options.update(type=_parse_list(_item_type(kind)), metavar="A,B,...")
        else:
            options.update(type=field.metadata.get("type", kind if isinstance(kind, type) else str))
        if "choices" in field.metadata:
            options["choices"] = list(field.metadata["choices"])
        elif "action" not in options and "metavar" not in options:
            options["metavar"] = setting.path[-1].upper()
        shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
        options["help"] = f"{help_text} (default: {shown if shown != '' else 'none'})".strip()
        groups[parent].add_argument(*flags, **options)


def values_from_args(args: argparse.Namespace, tree: Sequence[Setting]) -> dict[tuple[str, ...], Any]:
    """The settings the command line gave, by path."""
    values = {}
    for setting in tree:
        value = getattr(args, setting.name, None)
        if value is not None:
            values[setting.path] = tuple(value) if isinstance(value, list) else value
    return values


def values_from_toml(data: Mapping[str, Any], tree: Sequence[Setting], source: str,
                     root_table: str = "") -> dict[tuple[str, ...], Any]:
    """The settings a parsed TOML document gives, by path; an unknown table or key raises ValueError
    naming it. Top-level keys are the root's fields and the short flag names of the metadata (with
    underscores); ``[a.b]`` tables hold the fields under path a.b (``root_table``, if given, is one
    more name for the top level)."""
    by_path = {setting.path: setting for setting in tree}
    tables = {setting.path[:-1] for setting in tree}
    aliases = {s.field.metadata["flag"].replace("-", "_"): s.path for s in tree if "flag" in s.field.metadata}
    values: dict[tuple[str, ...], Any] = {}

    def walk(table: Mapping[str, Any], prefix: tuple[str, ...]) -> None:
        for key, value in table.items():
            path = (*prefix, key)
            if isinstance(value, Mapping):
                if path == (root_table,) and root_table:
                    walk(value, ())
                elif not any(t[:len(path)] == path for t in tables):
                    known = sorted(".".join(t) for t in tables if t)
                    raise ValueError(f"config file {source}: unknown table [{'.'.join(path)}] "
                                     f"(known: {', '.join(known)})")
                else:
                    walk(value, path)
            elif path in by_path or (not prefix and key in aliases):
                values[by_path[path].path if path in by_path else aliases[key]] = (
                    tuple(value) if isinstance(value, list) else value)
            else:
                where = f"[{'.'.join(prefix)}]" if prefix else "the top level"
                raise ValueError(f"config file {source}: unknown key {key!r} in {where}")
    walk(data, ())
    return values


def build(cls: type, values: Mapping[tuple[str, ...], Any], prefix: tuple[str, ...] = ()):
    """An instance of ``cls`` with the given settings (by path) over its defaults (nested configs
    built the same way; their own checks run)."""
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for field in dataclasses.fields(cls):
        path = (*prefix, field.name)
        if dataclasses.is_dataclass(hints[field.name]):
            kwargs[field.name] = build(hints[field.name], values, path)
        elif path in values:
            kwargs[field.name] = values[path]
    return cls(**kwargs)
