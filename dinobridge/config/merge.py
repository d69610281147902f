"""Strict, typed merge of plain data (a YAML file, a command-line override) into the structured config.

Walks the data alongside the dataclass schema, so every problem is reported as one line naming the full dotted key:
  unknown config key 'optim.lrr' (did you mean 'optim.lr'?) in FILE
  config key 'optim.lr' expects float or null, got 'abc' in override 'optim.lr=abc'
A plain number where a schedule mapping is expected means a constant schedule.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import typing
from typing import Any, Iterator, Mapping

from omegaconf import DictConfig, open_dict
from omegaconf.errors import OmegaConfBaseException

from dinobridge.config.schedules import SCHEDULE_TYPES, constant_schedule
from dinobridge.config.schema import Config
from dinobridge.errors import ConfigError


@functools.lru_cache(maxsize=None)
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _unwrap_optional(hint: Any) -> tuple[Any, bool]:
    """(inner type, is Optional) of a type hint."""
    if typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return hint, False


def _dict_value_type(hint: Any) -> Any | None:
    """X for Dict[str, X], else None."""
    if typing.get_origin(hint) in (dict, typing.Dict):
        return typing.get_args(hint)[1]
    return None


def describe_type(hint: Any) -> str:
    """Human-readable description of a schema type hint, e.g. 'float or null', 'a list of float'."""
    base, optional = _unwrap_optional(hint)
    if base is Any:
        return "any value"
    if dataclasses.is_dataclass(base):
        if issubclass(base, SCHEDULE_TYPES):
            text = "a schedule mapping (start, peak, end, warmup_epochs, ...) or a number"
        else:
            text = "a mapping"
    elif _dict_value_type(base) is not None:
        text = "a mapping of name -> " + describe_type(_dict_value_type(base))
    elif typing.get_origin(base) in (list, typing.List):
        text = "a list of " + describe_type(typing.get_args(base)[0])
    else:
        text = getattr(base, "__name__", str(base))
    return text + (" or null" if optional else "")


def _walk_keys(cls: type, prefix: str) -> Iterator[str]:
    for name, hint in _hints(cls).items():
        full = prefix + name
        yield full
        base, _ = _unwrap_optional(hint)
        if dataclasses.is_dataclass(base):
            yield from _walk_keys(base, full + ".")


@functools.lru_cache(maxsize=None)
def known_keys(schema: type = Config) -> tuple[str, ...]:
    """Every dotted key of the schema (sections and leaves; entries of name -> source mappings excluded)."""
    return tuple(_walk_keys(schema, ""))


def closest_key(full_key: str, siblings: typing.Iterable[str] = (), schema: type = Config) -> str | None:
    """The known key a mistyped `full_key` most likely meant (difflib), or None."""
    parent, _, leaf = full_key.rpartition(".")
    prefix = parent + "." if parent else ""
    siblings = list(siblings)
    every = known_keys(schema)
    for candidates, query, cutoff in ((siblings, leaf, 0.6), (every, full_key, 0.6)):
        lowered = {c.lower(): c for c in candidates}
        if query.lower() in lowered:  # wrong case only
            hit = lowered[query.lower()]
            return prefix + hit if candidates is siblings else hit
        match = difflib.get_close_matches(query, candidates, n=1, cutoff=cutoff)
        if match:
            return prefix + match[0] if candidates is siblings else match[0]
    same_leaf = [k for k in every if k.rpartition(".")[2] == leaf]  # right name, wrong section
    return same_leaf[0] if same_leaf else None


def _where(source: str) -> str:
    return f" in {source}" if source else ""


def unknown_key_error(full_key: str, siblings: typing.Iterable[str], source: str) -> ConfigError:
    guess = closest_key(full_key, siblings)
    hint = f" (did you mean '{guess}'?)" if guess else ""
    return ConfigError(f"unknown config key '{full_key}'{hint}{_where(source)}")


def type_error(full_key: str, hint: Any, value: Any, source: str) -> ConfigError:
    shown = "a mapping" if isinstance(value, Mapping) else repr(value)
    return ConfigError(f"config key '{full_key}' expects {describe_type(hint)}, got {shown}{_where(source)}")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _merge_mapping(node: DictConfig, schema: type | None, element: Any, data: Any, prefix: str, source: str) -> None:
    """Merge `data` into `node`, a dataclass section (`schema`) or a name -> `element` mapping (schema None)."""
    for raw_key, value in data.items():
        key = str(raw_key)
        full = prefix + key
        if schema is not None:
            hints = _hints(schema)
            if key not in hints:
                raise unknown_key_error(full, hints, source)
            hint = hints[key]
        else:
            hint = element
        _merge_value(node, key, hint, value, full, source)


def _set(node: DictConfig, key: str, value: Any) -> None:
    """node[key] = value; a new key (an entry of a name -> X mapping) needs struct mode lifted."""
    if key in node:
        node[key] = value
    else:
        with open_dict(node):
            node[key] = value


def _merge_value(node: DictConfig, key: str, hint: Any, value: Any, full: str, source: str) -> None:
    base, optional = _unwrap_optional(hint)
    if value is None:
        if optional or base is Any:
            _set(node, key, None)
            return
        raise ConfigError(f"config key '{full}' expects {describe_type(hint)}, got null{_where(source)}")
    element = _dict_value_type(base)
    if dataclasses.is_dataclass(base) or element is not None:
        if dataclasses.is_dataclass(base) and issubclass(base, SCHEDULE_TYPES) and _is_number(value):
            _set(node, key, base())  # a number replaces the whole schedule
            value = constant_schedule(float(value))
        if not isinstance(value, Mapping):
            raise type_error(full, hint, value, source)
        if key not in node or node.get(key) is None:
            _set(node, key, base() if element is None else {})
        _merge_mapping(node[key], base if element is None else None, element, value, full + ".", source)
        return
    try:
        _set(node, key, value)
    except OmegaConfBaseException:
        raise type_error(full, hint, value, source) from None


def merge_data(cfg: DictConfig, data: Any, source: str) -> None:
    """Merge plain nested data (mappings, lists, scalars) into the structured `cfg` in place; ConfigError on any
    unknown key or wrong type. `source` names where the data came from (a file, an override)."""
    if not isinstance(data, Mapping):
        kind = type(data).__name__
        raise ConfigError(f"expected a mapping of config sections at the top level, got {kind}{_where(source)}")
    _merge_mapping(cfg, Config, None, data, "", source)


def _locate(cfg: DictConfig, full_key: str, source: str) -> tuple[DictConfig, str, Any, bool]:
    """(parent node, last key, schema hint, whether the parent is a name -> X mapping) of an existing dotted key."""
    parts = full_key.split(".")
    node: DictConfig = cfg
    schema: type | None = Config
    element: Any = None
    for depth, key in enumerate(parts):
        here = ".".join(parts[: depth + 1])
        if schema is not None:
            hints = _hints(schema)
            if key not in hints:
                raise unknown_key_error(here, hints, source)
            hint = hints[key]
        elif key in node:
            hint = element
        else:
            raise ConfigError(f"config key '{here}' does not exist{_where(source)}")
        if depth == len(parts) - 1:
            return node, key, hint, schema is None
        base, _ = _unwrap_optional(hint)
        child = node.get(key)
        if not isinstance(child, DictConfig):
            raise ConfigError(f"config key '{full_key}' does not exist ('{here}' is not a mapping){_where(source)}")
        node, element = child, _dict_value_type(base)
        schema = base if dataclasses.is_dataclass(base) else None
    raise AssertionError("unreachable")


def delete_key(cfg: DictConfig, full_key: str, source: str) -> None:
    """`~key`: remove an entry of a name -> X mapping (e.g. `~data.imagenet_1k`) or null an optional key (e.g.
    `~schedules`); other schema keys cannot be deleted."""
    parent, key, hint, in_mapping = _locate(cfg, full_key, source)
    if in_mapping:
        with open_dict(parent):
            del parent[key]
    elif _unwrap_optional(hint)[1] or hint is Any:
        parent[key] = None
    else:
        raise ConfigError(f"config key '{full_key}' cannot be deleted (not nullable: set a value){_where(source)}")
