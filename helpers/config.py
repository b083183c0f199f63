"""Experiment configuration: defaults, then a YAML file, then dotted command-line overrides, merged and checked
against a script's :class:`Schema` in one place (:func:`load_config`). This module imports neither torch nor the
rest of the project, so scripts can parse and check their arguments in well under a second.
"""
from __future__ import annotations

import copy
import difflib
import math
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from common.errors import InvalidValueError, MissingFileError, shorten


class ConfigError(InvalidValueError):
    """A malformed config file or override, an unknown key or a value of the wrong type."""


# --------------------------------------------------------------------------------------------------------------
# Merging
# --------------------------------------------------------------------------------------------------------------


def merge(base: Mapping[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    """Recursive dict merge: mappings merge key by key, everything else in ``update`` replaces."""
    out = copy.deepcopy(dict(base))
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


#: The most YAML nodes a config (or one override) may expand to once its aliases are followed: a 300-byte
#: "billion laughs" file of nested aliases expands to hundreds of millions. Far above any real config.
MAX_EXPANDED_NODES = 100_000


class _ConfigLoader(yaml.SafeLoader):
    """``yaml.safe_load``'s loader, refusing a key given twice in one mapping (YAML would keep the last one
    silently) and alias expansion beyond :data:`MAX_EXPANDED_NODES` nodes."""

    def compose_document(self) -> yaml.Node | None:
        node = super().compose_document()
        if node is not None:
            size = _expanded_size(node)
            if size > MAX_EXPANDED_NODES:
                raise yaml.YAMLError(f"its aliases expand to more than {MAX_EXPANDED_NODES:,} values (an alias bomb?)")
        return node

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # "<<: *base" merges: its keys may be overridden
                continue
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                if key in seen:
                    raise yaml.YAMLError(f"the key {shorten(key)} is given twice (lines {seen[key]} and {line}): "
                                         "keep one")
                seen[key] = line
            except TypeError:  # an unhashable key: SafeLoader says so itself
                continue
        return super().construct_mapping(node, deep=deep)


# YAML 1.1 (PyYAML) reads 1e-3 and 1.5e3 as strings (its floats need a dot and a signed exponent); YAML 1.2 and
# every user read them as numbers. Plain integers still resolve first (the int resolver is consulted before this).
_ConfigLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789"))


def _expanded_size(root: yaml.Node) -> int:
    """The number of nodes ``root`` stands for once every alias is replaced by what it names (each distinct node
    is counted once and its size remembered, so a bomb is measured without being expanded)."""
    sizes: dict[int, int] = {}
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        if id(node) in sizes:
            continue
        children = ([n for pair in node.value for n in pair] if isinstance(node, yaml.MappingNode)
                    else node.value if isinstance(node, yaml.SequenceNode) else [])
        if children_done:
            sizes[id(node)] = min(1 + sum(sizes[id(c)] for c in children), MAX_EXPANDED_NODES + 1)
        else:
            stack.append((node, True))
            stack.extend((c, False) for c in children if id(c) not in sizes)
    return sizes[id(root)]


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """A YAML error as one line: what is wrong and where (YAML's own text spans several lines)."""
    mark = getattr(exc, "problem_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    problem = getattr(exc, "problem", None) or str(exc)
    return where + " ".join(str(problem).split())


def safe_load(text: Any) -> Any:
    """``yaml.safe_load`` with the config loader's limits (:class:`_ConfigLoader`)."""
    loader = _ConfigLoader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """Read a YAML config, following its optional ``base:`` chain (a file, relative to this one, whose values this
    one extends); a malformed file, a key given twice or an alias expansion past :data:`MAX_EXPANDED_NODES` is a
    :class:`ConfigError` of one line."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"config file not found: {path}")
    try:
        with open(path) as f:
            data = safe_load(f) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {_yaml_problem(exc)}") from None
    except RecursionError:
        raise ConfigError(f"{path} is not valid YAML: it nests too deeply") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level of a config must be a mapping, got {type(data).__name__}")
    base = data.pop("base", None)
    if base:
        data = merge(read_yaml(path.parent / base), data)
    return data


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"model.depth=101"`` -> (["model", "depth"], 101). The value is parsed as a YAML scalar or list (``true``,
    ``3``, ``0.5``, ``[1, 5, 10]``, ``null``); anything else stays a string."""
    if "=" not in text:
        raise ConfigError(f"override {shorten(text)} must look like key.sub=value")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"override {shorten(text)} has an empty key part")
    try:
        value = safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        if "expand" in str(exc):  # an alias bomb on the command line is refused, not kept as a string
            raise ConfigError(f"override {shorten(key)}: {_yaml_problem(exc)}") from None
        value = raw
    except RecursionError:
        raise ConfigError(f"override {shorten(key)}: the value nests too deeply") from None
    return parts, value


def apply_overrides(cfg: Mapping[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    out = copy.deepcopy(dict(cfg))
    for text in overrides:
        parts, value = parse_override(text)
        node = out
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {shorten(text)}: {shorten(part)} is a value, not a section")
            node = child
        node[parts[-1]] = value
    return out


# --------------------------------------------------------------------------------------------------------------
# Checking
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rule:
    """What a key accepts beyond its default's type.

    ``types``: accepted types (default: the default value's type; ints are accepted for floats); ``nullable``:
    ``null`` accepted (always, when the default is null); ``choices``; ``min`` / ``max`` for numbers (and for
    every item of a list of numbers); ``items``: the type of a list's items; ``length``: a list's length.
    """

    types: tuple[type, ...] | None = None
    nullable: bool = False
    choices: tuple[Any, ...] | None = None
    min: float | None = None
    max: float | None = None
    items: type | tuple[type, ...] | None = None
    length: int | None = None
    pattern: str | None = None
    pattern_text: str = ""

    def describe(self, default: Any) -> str:
        """What the key accepts, in words."""
        if self.pattern is not None:
            text = self.pattern_text or f"a string matching {self.pattern}"
        elif self.choices is not None:
            text = "one of " + ", ".join(repr(c) for c in self.choices)
        else:
            types = self.types or _default_types(default)
            text = " or ".join(_type_name(t) for t in types if not (t is int and float in types))
            if self.items is not None:
                items = self.items if isinstance(self.items, tuple) else (self.items,)
                text += " of " + " or ".join(_PLURALS.get(t, t.__name__) for t in items)
            if self.length is not None:
                text += f" of length {self.length}"
            if self.min is not None and self.max is not None:
                text += f" in [{self.min}, {self.max}]"
            elif self.min is not None:
                text += f" >= {self.min}"
            elif self.max is not None:
                text += f" <= {self.max}"
        if self.nullable or default is None:
            text += " (or null)"
        return text


@dataclass(frozen=True)
class Schema:
    """A script's defaults and the rules its config is checked against.

    The merged config is checked before anything runs: every key must be one of the defaults' keys (an unknown key
    is an error that names it and the closest valid one), every value must have the default's type (``None``
    defaults accept any value unless a :class:`Rule` says more) and pass its rule (choices, bounds).

    ``open_sections``: dotted keys of sections whose contents are passed through unchecked (e.g. keyword
    arguments of a dataclass that checks them itself).
    """

    name: str
    defaults: Mapping[str, Any]
    rules: Mapping[str, Rule] = field(default_factory=dict)
    open_sections: tuple[str, ...] = ()

    def keys(self) -> list[str]:
        """Every dotted key the schema knows (sections included)."""
        return list(_walk_keys(self.defaults))

    def check(self, cfg: Mapping[str, Any]) -> None:
        """Raise :class:`ConfigError` on the first unknown key or unacceptable value of ``cfg``."""
        unknown_rules = [k for k in self.rules if k not in set(self.keys())]
        if unknown_rules:  # a programming error: a rule for a key the defaults lack
            raise ConfigError(f"{self.name}: rules for unknown keys {unknown_rules}")
        self._check_section(cfg, self.defaults, prefix="")

    def _check_section(self, cfg: Mapping[str, Any], defaults: Mapping[str, Any], prefix: str) -> None:
        for key, value in cfg.items():
            dotted = f"{prefix}{key}"
            if not isinstance(key, str) or key not in defaults:
                raise ConfigError(self._unknown(prefix + (key if isinstance(key, str) else shorten(key))))
            default = defaults[key]
            rule = self.rules.get(dotted, Rule())
            if isinstance(default, Mapping) and rule.types is None:
                if value is None and rule.nullable:
                    continue
                if not isinstance(value, Mapping):
                    raise ConfigError(f"{dotted} is a section (keys {', '.join(map(str, default)) or 'free-form'}), "
                                      f"got the value {shorten(value)}")
                if dotted not in self.open_sections:
                    self._check_section(value, default, prefix=f"{dotted}.")
                continue
            problem = _check_value(value, default, rule)
            if problem:
                raise ConfigError(f"{dotted}={shorten(value)}: {problem}; {dotted} accepts {rule.describe(default)}")

    def _unknown(self, dotted: str) -> str:
        valid = self.keys()
        lowered = {k.lower(): k for k in valid}
        parent = dotted.rsplit(".", 1)[0] + "." if "." in dotted else ""
        siblings = [k for k in valid if k.startswith(parent) and "." not in k[len(parent):]]
        guess = (difflib.get_close_matches(dotted.lower(), [k.lower() for k in siblings], n=1, cutoff=0.5)
                 or difflib.get_close_matches(dotted.lower(), list(lowered), n=1, cutoff=0.6))
        hint = f"; did you mean {lowered[guess[0]]!r}?" if guess else ""
        return (f"unknown config key {shorten(dotted)}{hint} (valid keys: --print-config lists them with their "
                "defaults)")


def _walk_keys(defaults: Mapping[str, Any], prefix: str = "") -> Iterator[str]:
    for key, value in defaults.items():
        yield f"{prefix}{key}"
        if isinstance(value, Mapping):
            yield from _walk_keys(value, f"{prefix}{key}.")


def _default_types(default: Any) -> tuple[type, ...]:
    if isinstance(default, bool):
        return (bool,)
    if isinstance(default, int):
        return (int,)
    if isinstance(default, float):
        return (float, int)
    if isinstance(default, (list, tuple)):
        return (list,)
    if default is None:
        return (object,)
    return (type(default),)


def _type_name(t: type) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list",
            dict: "a mapping", object: "any value"}.get(t, t.__name__)


_PLURALS = {bool: "booleans", int: "integers", float: "numbers", str: "strings"}


def _is_instance(value: Any, types: tuple[type, ...]) -> bool:
    if isinstance(value, bool) and bool not in types and object not in types:
        return False  # YAML's true/false are not numbers here
    return isinstance(value, tuple(list if t is list else t for t in types))


def _check_value(value: Any, default: Any, rule: Rule) -> str | None:
    if value is None:
        return None if (rule.nullable or default is None) else "null is not accepted"
    if rule.choices is not None:  # a list value: every item must be a choice
        values = value if isinstance(value, list) else [value]
        ok = all(any(v == c and isinstance(v, bool) == isinstance(c, bool) for c in rule.choices) for v in values)
        return None if ok else "not a valid choice"
    types = rule.types or _default_types(default)
    if not _is_instance(value, types):
        return f"wrong type ({type(value).__name__})"
    if rule.pattern is not None and not (isinstance(value, str) and re.fullmatch(rule.pattern, value)):
        return "not a valid value"
    if isinstance(value, list):
        if rule.length is not None and len(value) != rule.length:
            return f"a list of {len(value)} items"
        if rule.items is not None:
            items = rule.items if isinstance(rule.items, tuple) else (rule.items,)
            if float in items and int not in items:
                items = (*items, int)
            bad = [v for v in value if not _is_instance(v, items)]
            if bad:
                return f"item {shorten(bad[0])} has the wrong type"
        numbers = [v for v in value if isinstance(v, (int, float)) and not isinstance(v, bool)]
    else:
        numbers = [value] if isinstance(value, (int, float)) and not isinstance(value, bool) else []
    for v in numbers:
        if not math.isfinite(v):  # NaN passes every "v < min" test, and inf every open bound
            return "not a finite number"
        if rule.min is not None and v < rule.min:
            return "below the minimum"
        if rule.max is not None and v > rule.max:
            return "above the maximum"
    return None


# --------------------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------------------


def load_config(
    path: str | os.PathLike | None = None,
    overrides: Sequence[str] = (),
    defaults: Mapping[str, Any] | None = None,
    *,
    schema: Schema | None = None,
) -> dict[str, Any]:
    """defaults (``schema.defaults`` when a schema is given) <- YAML file (and its bases) <- dotted overrides,
    then checked against ``schema``. Errors are :class:`ConfigError` (or FileNotFoundError for a missing file).

        cfg = load_config("configs/cvnet_global_r50.yaml", ["model.depth=101", "data.root=/data"], schema=EVAL)
        cfg["model"]["depth"]  # -> 101
    """
    if schema is not None and defaults is None:
        defaults = schema.defaults
    cfg = copy.deepcopy(dict(defaults or {}))
    if path is not None:
        cfg = merge(cfg, read_yaml(path))
    cfg = apply_overrides(cfg, overrides)
    if schema is not None:
        schema.check(cfg)
    return cfg


def dump_config(cfg: Mapping[str, Any]) -> str:
    """The config as YAML, keys in their order."""
    return yaml.safe_dump(dict(cfg), sort_keys=False)


def save_resolved(cfg: Mapping[str, Any], out_dir: str | os.PathLike, name: str = "config.yaml") -> Path:
    """Write the fully resolved config next to a run's outputs."""
    out = Path(out_dir) / name
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w") as f:
        f.write(dump_config(cfg))
    return out
