"""Typed configuration: YAML presets loaded into dataclasses, with overrides.

Every capgap command describes its settings as a dataclass. A run resolves them
from three layers, later ones winning: the dataclass defaults, a YAML file
(``--config configs/demo.yaml`` or a packaged preset name such as ``demo``),
and command-line overrides (``--seed 3`` for top-level fields, ``--set
web.mismatch_rate=0.2`` for any dotted path). Unknown keys and ill-typed values
are rejected with a message naming the key. ``save_resolved`` writes the final
config next to a run's outputs.

    cfg = load_config(SynthConfig, "configs/synth.yaml", ["n=1000"])
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.resources
import os
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config key is unknown or its value has the wrong type."""


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; return it (converted where lossless)."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        options = get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(f"{key}: {value!r} is not a {_type_name(tp)}")
    if origin is Literal:
        if value not in get_args(tp):
            raise ConfigError(f"{key}: {value!r} is not one of {list(get_args(tp))}")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping for {tp.__name__}, got {value!r}")
        return from_dict(tp, value, prefix=f"{key}.")
    if origin in (list, tuple):
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        args = get_args(tp)
        item_tp = args[0] if args else Any
        items = [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        key_tp, val_tp = get_args(tp) or (Any, Any)
        return {
            _coerce(k, key_tp, f"{key}.{k}"): _coerce(v, val_tp, f"{key}.{k}")
            for k, v in value.items()
        }
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    return value


def from_dict(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    """Build dataclass ``cls`` from a mapping, rejecting unknown keys and wrong types."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or cls.__name__}: expected a mapping, got {data!r}")
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"unknown config key {prefix}{unknown[0]!s} (valid keys under "
            f"{prefix.rstrip('.') or cls.__name__}: {', '.join(sorted(fields))})"
        )
    kwargs = {name: _coerce(value, hints[name], f"{prefix}{name}") for name, value in data.items()}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{prefix or cls.__name__}: {err}") from err


def to_dict(cfg: Any) -> dict[str, Any]:
    """A plain-data (YAML/JSON-ready) view of a config dataclass."""

    def plain(value: Any) -> Any:
        if dataclasses.is_dataclass(value):
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, list | tuple):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, Path):
            return str(value)
        return value

    return plain(cfg)


def packaged_config_dir() -> Path:
    """The folder holding the packaged presets (``capgap.configs``)."""
    return Path(str(importlib.resources.files("capgap.configs")))


def resolve_config_path(name_or_path: str | os.PathLike) -> Path:
    """A YAML path as given, or a packaged preset name like ``demo`` or ``runners/direct``."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    for candidate in (packaged_config_dir() / path, packaged_config_dir() / f"{path}.yaml"):
        if candidate.is_file():
            return candidate
    raise ConfigError(f"config file not found: {name_or_path} (nor a packaged preset of that name)")


def read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    with open(path, encoding="utf-8") as fh:
        data = yaml.safe_load(fh) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    return data


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"a.b=0.5"`` -> (["a", "b"], 0.5); the value is read as YAML (so ``true`` is a bool)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key=value")
    key, raw = text.split("=", 1)
    key = key.strip().lstrip("-")
    if not key:
        raise ConfigError(f"override {text!r} has an empty key")
    return key.split("."), yaml_scalar(raw) if raw.strip() else ""


_FLOAT_RE = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$")


def yaml_scalar(text: str) -> Any:
    """Read a command-line value as YAML, with ``1e-5`` as a number (YAML 1.1 wants ``1.0e-5``)."""
    value = yaml.safe_load(text)
    if isinstance(value, str) and _FLOAT_RE.match(value.strip()):
        return float(value)
    return value


def _set_path(data: dict[str, Any], path: list[str], value: Any) -> None:
    node = data
    for part in path[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{'.'.join(path)}: {part} is not a section")
        node = child
    node[path[-1]] = value


def merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Recursive dict merge; ``update`` wins."""
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def _is_opaque_mapping(tp: Any) -> bool:
    """``dict`` / ``dict[str, Any]`` fields (constructor kwargs): replaced, never merged."""
    return tp is dict or (get_origin(tp) is dict and get_args(tp)[1:] == (Any,))


def _strip_optional(tp: Any) -> Any:
    if get_origin(tp) in (typing.Union, types.UnionType):
        options = [a for a in get_args(tp) if a is not type(None)]
        if len(options) == 1:
            return options[0]
    return tp


def merge_sections(cls: Any, base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """``merge`` that follows the dataclass ``cls``: a YAML section updates the defaults of a
    nested config key by key, but a free-form mapping (``timm_args: {...}``, kwargs for a
    constructor) replaces its default whole: merging kwargs meant for another class breaks it.
    """
    hints = typing.get_type_hints(cls) if dataclasses.is_dataclass(cls) else {}
    out = dict(base)
    for key, value in update.items():
        tp = _strip_optional(hints.get(key, Any))
        mergeable = isinstance(value, dict) and isinstance(out.get(key), dict)
        if not mergeable or _is_opaque_mapping(tp):
            out[key] = value
        elif dataclasses.is_dataclass(tp):
            out[key] = merge_sections(tp, out[key], value)
        else:
            out[key] = merge(out[key], value)
    return out


def load_config(
    cls: type[T],
    path: str | os.PathLike | None = None,
    overrides: typing.Sequence[str] = (),
    section: str | None = None,
    values: dict[str, Any] | None = None,
) -> T:
    """Defaults <- YAML file (optionally one ``section`` of it) <- overrides.

    ``overrides`` are ``"dotted.key=value"`` strings whose value is read as YAML;
    ``values`` maps dotted keys to already-typed values (e.g. from argparse).
    """
    data: dict[str, Any] = {}
    if path is not None:
        data = read_yaml(resolve_config_path(path))
        if section is not None:
            data = data.get(section, {}) or {}
    data = merge_sections(cls, to_dict(cls()), data) if _has_all_defaults(cls) else data
    for text in overrides:
        key_path, value = parse_override(text)
        _set_path(data, key_path, value)
    for key, value in (values or {}).items():
        _set_path(data, key.split("."), value)
    return from_dict(cls, data)


def _has_all_defaults(cls: type) -> bool:
    try:
        cls()
    except TypeError:
        return False
    return True


def save_resolved(cfg: Any, out_dir: str | os.PathLike, name: str = "config.yaml") -> Path:
    """Write the resolved config next to a run's outputs; returns the file written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    target = out / name
    with open(target, "w", encoding="utf-8") as fh:
        yaml.safe_dump(to_dict(cfg), fh, sort_keys=False)
    return target


# --- argparse glue ---------------------------------------------------------------------------


def _leaf_fields(cls: type) -> list[tuple[str, Any, Any]]:
    hints = get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp) or get_origin(tp) in (list, tuple, dict):
            continue
        out.append((f.name, tp, f.metadata.get("help", "")))
    return out


def command_parser(prog: str, description: str | None) -> argparse.ArgumentParser:
    """The parser of a ``capgap`` command: its module docstring as the description, with the
    docstring's line breaks kept (its examples stay one per line)."""
    return argparse.ArgumentParser(
        prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )


def add_config_args(parser: argparse.ArgumentParser, cls: type, default_config: str | None) -> None:
    """Add ``--config``, ``--set`` and one snake_case flag per top-level scalar field of ``cls``."""
    parser.add_argument(
        "--config",
        default=default_config,
        help=f"YAML preset (path or packaged name; default: {default_config})",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override any config key by dotted path, e.g. --set train.lr=1e-3 (repeatable)",
    )
    group = parser.add_argument_group(f"{cls.__name__} fields (override the config file)")
    for name, tp, help_text in _leaf_fields(cls):
        if tp is bool:
            group.add_argument(
                f"--{name}", dest=f"cfg__{name}", action="store_const", const=True, help=help_text
            )
            group.add_argument(
                f"--no_{name}", dest=f"cfg__{name}", action="store_const", const=False
            )
        else:
            group.add_argument(
                f"--{name}", dest=f"cfg__{name}", metavar=name.upper(), help=help_text
            )


def parse_command(
    argv: typing.Sequence[str] | None,
    prog: str,
    doc: str | None,
    cls: type[T],
    default_config: str | None = None,
    arguments: typing.Callable[[argparse.ArgumentParser], None] | None = None,
    section: typing.Callable[[argparse.Namespace], str | None] | None = None,
) -> tuple[T, argparse.Namespace]:
    """Parse a ``capgap`` command's argv into (its config, the parsed args).

    ``arguments`` adds the command's own arguments (positionals, ...); ``section`` picks the
    YAML section to read from the parsed args (and may change ``args.config``). A bad
    config key or value exits with ``"<prog>: <message>"``.
    """
    parser = command_parser(prog, doc)
    if arguments is not None:
        arguments(parser)
    add_config_args(parser, cls, default_config)
    args = parser.parse_args(argv)
    try:
        chosen = section(args) if section is not None else None
        return config_from_args(cls, args, section=chosen), args
    except ConfigError as err:
        raise SystemExit(f"{prog}: {err}") from err


def config_from_args(cls: type[T], args: argparse.Namespace, section: str | None = None) -> T:
    """Resolve ``cls`` from parsed args made by :func:`add_config_args`."""
    types_by_name = {name: tp for name, tp, _ in _leaf_fields(cls)}
    values: dict[str, Any] = {}
    for key, value in vars(args).items():
        if key.startswith("cfg__") and value is not None:
            name = key[len("cfg__") :]
            values[name] = _from_cli_text(value, types_by_name[name], name)
    return load_config(cls, args.config, args.overrides, section=section, values=values)


def _from_cli_text(value: Any, tp: Any, name: str) -> Any:
    """A flag's text as the field's type: strings stay verbatim, the rest parse as YAML."""
    if not isinstance(value, str):
        return value
    accepts_str = tp is str or (get_origin(tp) in (Union, types.UnionType) and str in get_args(tp))
    if accepts_str:
        return value
    try:
        return yaml_scalar(value)
    except yaml.YAMLError as err:
        raise ConfigError(f"--{name}: cannot parse {value!r}") from err
