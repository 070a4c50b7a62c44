"""Config machinery: build typed dataclasses from YAML recipes + ``--set key=value`` overrides, dump them.

Every command of the CLI resolves one :class:`RunConfig` (a tree of dataclasses, one section per
pipeline stage). A recipe YAML sets only what differs from the defaults; ``--set a.b=c`` overrides
any leaf. Unknown keys and values of the wrong type are refused with a :class:`ConfigError` that
names the key, so a typo never silently falls back to a default. The resolved config is written
into every output directory (``config.yaml``) so a run says exactly what it did.

This module only knows about dataclasses and typing: it imports no torch, so ``import
llm2clip_vlm`` stays light.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A recipe or override that does not fit the config schema (the message names the key)."""


@dataclasses.dataclass(frozen=True)
class Range:
    """The values a numeric config field accepts (checked by :func:`build` when a recipe is read).

    A config dataclass lists its fields' ranges in a class-level table ``RANGES: ClassVar[dict[str,
    Range]]`` next to the fields (``tests/test_config_io.py`` requires one for every int and float
    field of the recipe schema). A list value (``betas``) is checked item by item.

    Attributes:
        low, high: the bounds (None = unbounded); ``low_open``/``high_open``: excluded.
        words: how the range reads in an error message ("an integer >= 1 (a size)").
    """

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    words: str = "a number"

    def problem(self, value: Any) -> str | None:
        """Why ``value`` is out of range, or None."""
        if isinstance(value, (list, tuple)):
            return next((p for p in map(self.problem, value) if p), None)
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            return None  # the type was already checked; None in an Optional field is allowed
        if isinstance(value, float) and not math.isfinite(value):
            return f"must be {self.words}, got {value!r} (not a finite number)"
        below = self.low is not None and (value <= self.low if self.low_open else value < self.low)
        above = self.high is not None and (value >= self.high if self.high_open else value > self.high)
        return f"must be {self.words}, got {value!r}" if below or above else None


# The ranges config fields use. A "count" may be 0, which means "off" / "all" / "none" (each
# field's comment says which); a "size" is at least 1.
SIZE = Range(low=1, words="an integer >= 1 (a size)")
COUNT = Range(low=0, words="an integer >= 0")
SEED = Range(low=0, high=2**32 - 1, words="an integer in [0, 2**32 - 1] (a seed)")
INDEX = Range(words="an integer (negative counts from the end)")
RATE = Range(low=0, low_open=True, words="a finite number > 0 (a rate)")
NONNEGATIVE = Range(low=0, words="a finite number >= 0 (0 = off)")
FINITE = Range(words="a finite number")
FRACTION = Range(low=0, high=1, words="a fraction in [0, 1]")
PROBABILITY = Range(low=0, high=1, low_open=True, words="a probability in (0, 1]")
DROPOUT = Range(low=0, high=1, high_open=True, words="a dropout rate in [0, 1)")
BETA = Range(low=0, high=1, high_open=True, words="a decay rate in [0, 1) (an Adam beta)")


def _check_ranges(obj: Any, prefix: str) -> None:
    """Refuse a built section whose values lie outside the ranges its ``RANGES`` table gives."""
    table: Mapping[str, Range] = getattr(type(obj), "RANGES", {})
    for name, rule in table.items():
        problem = rule.problem(getattr(obj, name))
        if problem:
            key = f"{prefix}.{name}" if prefix else name
            raise ConfigError(f"{key} {problem}")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and convert where it is lossless."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        # A mapping for a section, or a list for a list: that member's own message (e.g. an
        # unknown key) is the one that helps, not "does not fit A | B".
        for arg in args:
            if (dataclasses.is_dataclass(arg) and isinstance(value, dict)) or (
                get_origin(arg) is list and isinstance(value, list)
            ):
                return _coerce(value, arg, key)
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: {value!r} does not fit {_type_name(tp)}")
    if origin is typing.Literal:
        if value not in get_args(tp):
            raise ConfigError(f"{key}: {value!r} is not one of {list(get_args(tp))}")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping for section {tp.__name__}, got {value!r}")
        return build(tp, value, prefix=key)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item_tp, *_) = get_args(tp) or (Any,)
        items = [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        k_tp, v_tp = get_args(tp) or (Any, Any)
        return {_coerce(k, k_tp, key): _coerce(v, v_tp, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "3e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")


def build(cls: type[T], data: dict[str, Any] | None = None, prefix: str = "") -> T:
    """Build dataclass ``cls`` from a (partial) nested mapping, validating every key and type."""
    data = dict(data or {})
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(fields))
    moved = getattr(cls, "MOVED", {})  # old key -> its new place in this section (a renamed key)
    for name in unknown:
        if name in moved:
            old, new = (".".join(filter(None, [prefix, k])) for k in (name, moved[name]))
            raise ConfigError(f"{old!r} is now {new!r}: rename it in the recipe or --set")
    if unknown:
        where = f"section '{prefix}'" if prefix else "the top level"
        raise ConfigError(
            f"unknown key {'.'.join(filter(None, [prefix, unknown[0]]))!r} in {where}; "
            f"known keys: {', '.join(sorted(fields))}"
        )
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        tp = hints[name]
        if dataclasses.is_dataclass(tp) and isinstance(value, dict):
            # A partial section: start from the section's defaults.
            base = to_dict(getattr(cls(), name)) if _has_defaults(cls) else {}
            value = _deep_merge(base, value)
        kwargs[name] = _coerce(value, tp, key)
    try:
        obj = cls(**kwargs)
    except TypeError as e:  # a required field with no default
        raise ConfigError(f"{prefix or cls.__name__}: {e}") from e
    _check_ranges(obj, prefix)
    return obj


def _has_defaults(cls: type) -> bool:
    return all(
        f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
        for f in dataclasses.fields(cls)
    )


def _deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def to_dict(cfg: Any) -> Any:
    """Plain nested dict/list form of a config (for YAML/JSON)."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, (list, tuple)):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, dict):
        return {k: to_dict(v) for k, v in cfg.items()}
    return cfg


def parse_override(item: str) -> tuple[list[str], Any]:
    """``"stage1.lr=2e-4"`` -> (["stage1", "lr"], 0.0002). Values are parsed as YAML scalars."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like section.key=value")
    key, raw = item.split("=", 1)
    path = [p for p in key.strip().split(".") if p]
    if not path:
        raise ConfigError(f"override {item!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {item!r}: value is not valid YAML ({e})") from e
    return path, value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    data = dict(data)
    for item in overrides:
        path, value = parse_override(item)
        node: Any = data
        for p, after in zip(path[:-1], path[1:], strict=True):
            node = _child(node, p, item)
            if isinstance(node, list) and not after.isdigit():
                raise ConfigError(
                    f"override {item!r}: {p!r} is a list; name an entry by its number ({p}.0.{after}=...)"
                )
            if not isinstance(node, (dict, list)):
                raise ConfigError(f"override {item!r}: {p!r} is not a section")
        if isinstance(node, list):
            _child(node, path[-1], item)  # the entry must exist
            node[int(path[-1])] = value
        else:
            node[path[-1]] = value
    return data


def _child(node: Any, key: str, item: str) -> Any:
    """``node[key]`` for an override's path: a section (created when missing) or a list entry."""
    if isinstance(node, list):
        if not key.isdigit() or int(key) >= len(node):
            raise ConfigError(f"override {item!r}: the list has no entry {key!r} ({len(node)} entries)")
        return node[int(key)]
    if not isinstance(node.get(key, {}), (dict, list)):
        return node[key]
    return node.setdefault(key, {})


class DuplicateKeyError(yaml.constructor.ConstructorError):
    """A mapping that names one key twice (plain YAML lets the last one win, silently)."""


class _UniqueKeyLoader(yaml.SafeLoader):
    """The safe loader (never executes tags) that refuses a key given twice in one mapping."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, Any] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)  # type: ignore[no-untyped-call]
            if isinstance(key, typing.Hashable) and key in seen:
                line = key_node.start_mark.line + 1
                raise DuplicateKeyError(
                    None,
                    None,
                    f"key {key!r} is given twice (lines {seen[key]} and {line})",
                    key_node.start_mark,
                )
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


def safe_load_unique(text: str) -> Any:
    """``yaml.safe_load`` that refuses duplicate keys (:class:`DuplicateKeyError`)."""
    return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader subclass)


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a recipe with the safe YAML loader (never executes tags; a key given twice is refused)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"recipe {path} does not exist")
    try:
        data = safe_load_unique(path.read_text(encoding="utf-8")) or {}
    except DuplicateKeyError as e:
        raise ConfigError(f"recipe {path}: {e.problem}: remove one of them") from e
    except UnicodeDecodeError as e:
        raise ConfigError(f"recipe {path} is not UTF-8 text (byte {e.start}: {e.reason})") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"recipe {path} is not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"recipe {path} must be a mapping of sections, got {type(data).__name__}")
    return data


def load(cls: type[T], recipe: str | Path | None = None, overrides: list[str] | None = None) -> T:
    """Resolve a config of type ``cls`` from defaults, an optional recipe and overrides."""
    data = read_yaml(recipe) if recipe else {}
    data.pop("_base_", None)  # documentation-only key allowed at the top of recipes
    data = apply_overrides(data, overrides or [])
    return build(cls, data)


def dump(cfg: Any, path: str | Path) -> Path:
    """Write the resolved config as YAML (``config.yaml`` in every output directory)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    return path
