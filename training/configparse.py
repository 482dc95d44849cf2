"""Config dataclass ⇄ command line and YAML for the training child.

`parse_config(cls, argv)`: defaults < `--config FILE.yaml` < `--kebab-case` flags, every value coerced to the
field's type, unknown YAML keys refused, then `cfg.validate()`. Errors are one-line `ConfigError`s naming the key.

Not transformers.HfArgumentParser or TRL's TrlParser, checked with transformers 5.23 / TRL 1.12: importing the former
loads transformers (~0.7 s on an idle machine, against 0.1 s for `python -m training dpo --help` now), and the
latter (a torch-free copy, +0.2 s) sets YAML values as argparse defaults without type checks (`lora_r: 3.5` or
`learning_rate: true` pass), keeps `--init-adapter none` as the text "none" and reports bad flags or keys as
multi-part ValueErrors, so the checks and one-line errors here would be needed on top of it anyway.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import types
import typing
from pathlib import Path
from typing import Any

import yaml

C = typing.TypeVar("C")


class ConfigError(ValueError):
    """A bad config value or file; str() is one line naming the key."""


_NONE_WORDS = ("none", "null", "")
_TRUE_WORDS = ("true", "yes", "1", "on")
_FALSE_WORDS = ("false", "no", "0", "off")


def _field_type(cls: type, name: str) -> tuple[type, bool]:
    """(base type, accepts None) of a dataclass field, from its (string) annotation."""
    hint = typing.get_type_hints(cls)[name]
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return args[0], True
    return hint, False


def _coerce(cls: type, name: str, value: Any) -> Any:
    """A YAML or command-line value turned into the field's type; ConfigError names the key."""
    base, optional = _field_type(cls, name)
    if value is None or (optional and isinstance(value, str) and value.strip().lower() in _NONE_WORDS):
        if optional:
            return None
        raise ConfigError(f"{name}: a value is required (got nothing)")
    try:
        if base is bool:
            if isinstance(value, bool):
                return value
            word = str(value).strip().lower()
            if word in _TRUE_WORDS + _FALSE_WORDS:
                return word in _TRUE_WORDS
            raise ValueError
        if base is int:
            return _whole(name, value)
        if base is float:
            if isinstance(value, bool):
                raise ValueError
            number = float(value)
            if not math.isfinite(number):
                raise ValueError
            return number
        if base is str:
            if isinstance(value, dict | list):
                raise ValueError
            return str(value)
    except ConfigError:
        raise
    except (TypeError, ValueError, OverflowError):  # OverflowError: int("1e400") is int(inf)
        raise ConfigError(f"{name}: expected {base.__name__}, got {value!r}") from None
    return value


def _whole(name: str, value: Any) -> int:
    """An int field's value: an int, or a number or text that is a whole number ("8", "2.0", "1e3", 2.0).
    A fraction ("8.9e0", 1.5) is refused, never cut to its whole part; ValueError for what is no number at all."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            number = float(value)  # "2.0", "1e3"; ValueError for "abc"
    else:
        number = value
    if not math.isfinite(number):
        raise ValueError
    if not number.is_integer():
        raise ConfigError(f"{name}: expected a whole number, got {value!r} (a fraction is not cut off)")
    return int(number)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def build_parser(cls: type) -> argparse.ArgumentParser:
    """--config FILE.yaml plus one --kebab-case flag per dataclass field (defaults shown in --help)."""
    parser = argparse.ArgumentParser(
        prog=f"python -m training {getattr(cls, 'method_name', '')}".strip(),
        description=(cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else None,
        argument_default=argparse.SUPPRESS,
    )
    parser.add_argument("--config", metavar="FILE.yaml", help="YAML with any of the fields below; flags override it")
    for spec in dataclasses.fields(cls):
        base, _ = _field_type(cls, spec.name)
        default = spec.default if spec.default is not dataclasses.MISSING else None
        metavar = "true|false" if base is bool else spec.name.upper()
        parser.add_argument(
            _flag(spec.name),
            dest=spec.name,
            metavar=metavar,
            help=f"{spec.metadata.get('help', '')} (default: {default})",
        )
    return parser


class _Parser(argparse.ArgumentParser):
    """argparse that raises ConfigError instead of exiting, so run_method reports it like any bad value."""

    def error(self, message: str) -> typing.NoReturn:
        raise ConfigError(message)


def parse_config(cls: type[C], argv: list[str]) -> C:
    """Defaults < --config YAML < flags; every value type-checked, then `validate()`. Raises ConfigError."""
    parser = build_parser(cls)
    parser.__class__ = _Parser
    args = vars(parser.parse_args(argv))
    values: dict[str, Any] = {}
    config_file = args.pop("config", None)
    if config_file:
        values = dict(vars(build_config(cls, _read_yaml(config_file), where=config_file)))
    for key, value in args.items():
        values[key] = _coerce(cls, key, value)
    cfg = cls(**values)
    cfg.validate()
    return cfg


def flag_names(cls: type, argv: list[str]) -> set[str]:
    """The fields set by a command-line flag (not by --config or a default). Raises ConfigError like parse_config."""
    parser = build_parser(cls)
    parser.__class__ = _Parser
    return set(vars(parser.parse_args(argv))) - {"config"}


def build_config(cls: type[C], settings: dict, where: str = "settings") -> C:
    """`cls` with these fields over its defaults, each type-checked (not `validate()`d). Raises ConfigError."""
    known = {f.name for f in dataclasses.fields(cls)}
    values = {}
    for key, value in settings.items():
        if key not in known:
            raise ConfigError(f"{where}: unknown key {key!r} (known: {', '.join(sorted(known))})")
        values[key] = _coerce(cls, key, value)
    return cls(**values)


def _read_yaml(path: str) -> dict:
    try:
        loaded = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"config: cannot read {path}: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config: {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"config: {path} must hold a mapping of field: value")
    return loaded


def out_dir_hint(argv: list[str]) -> str | None:
    """Best-effort RUN_DIR from raw argv/YAML, so even a config error is reported in progress.jsonl."""
    out = None
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            try:
                out = (yaml.safe_load(Path(argv[i + 1]).read_text(encoding="utf-8")) or {}).get("out") or out
            except (OSError, yaml.YAMLError, AttributeError):
                pass
        elif arg == "--out" and i + 1 < len(argv):
            out = argv[i + 1]
        elif arg.startswith("--out="):
            out = arg.split("=", 1)[1]
    return str(out) if out else None
