"""Configs from and to YAML and dicts: `load_config`, `parse_config`, `dump_config`, with errors that name the
field and say what was wrong (`training.beta must be > 0, got -1`)."""

import difflib
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from alignment_core.config.pipeline_config import PipelineConfig

__all__ = [  # what the package re-exports
    "ConfigError",
    "UniqueKeyLoader",
    "dump_config",
    "load_config",
    "parse_config",
    "yaml_load_unique",
]


class ConfigError(ValueError):
    """A config that cannot be used, with one line per problem naming the field."""


_STRICT_TYPES = {"float_type": "a number", "int_type": "an integer", "bool_type": "true or false"}
_BOUND_WORDS = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}


def _fields_at(location: tuple) -> list[str]:
    """The field names of the config section at `location` (e.g. ("training",)), for suggestions."""
    section: type[BaseModel] = PipelineConfig
    for name in location:
        annotation = section.model_fields[name].annotation if name in section.model_fields else None
        candidates = [annotation, *getattr(annotation, "__args__", ())]
        section = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if section is None:
            return []
    return list(section.model_fields)


def _looks_like_a_value(text: Any) -> bool:
    """A string a lax parser would have read as a number or a bool ('1e-4', '8', 'yes'): quoted by mistake."""
    if not isinstance(text, str):
        return False
    try:
        float(text)
    except ValueError:
        return text.strip().lower() in ("true", "false", "yes", "no", "on", "off")
    return True


def _describe(error: dict) -> str:
    field = ".".join(str(part) for part in error["loc"]) or "config"
    got = f", got {error['input']!r}" if not isinstance(error.get("input", {}), dict) else ""
    if error["type"] in _BOUND_WORDS:
        bound = next(iter(error["ctx"].values()))
        bound = int(bound) if isinstance(bound, float) and bound.is_integer() else bound
        return f"{field} must be {_BOUND_WORDS[error['type']]} {bound}{got}"
    if error["type"] == "extra_forbidden":
        known = _fields_at(error["loc"][:-1])
        close = difflib.get_close_matches(str(error["loc"][-1]), known, n=1, cutoff=0.6)
        hint = f"; did you mean {close[0]!r}?" if close else f"; known: {', '.join(known)}"
        return f"{field} is not a known field{hint}"
    if error["type"] in _STRICT_TYPES and _looks_like_a_value(error.get("input")):
        return (f"{field} must be {_STRICT_TYPES[error['type']]}, got the string {error['input']!r} "
                "(write it without quotes)")
    message = error["msg"].removeprefix("Value error, ")
    return f"{field}: {message}{got}"


def parse_config(data: dict[str, Any]) -> PipelineConfig:
    """Validate a plain dict into a PipelineConfig, raising ConfigError naming each wrong field."""
    try:
        return PipelineConfig.model_validate(data or {})
    except ValidationError as error:
        raise ConfigError("invalid config:\n" + "\n".join(_describe(e) for e in error.errors())) from None


class UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that rejects a mapping repeating a key (plain YAML keeps the last one silently).

    Keys brought in by a merge (`<<: *anchor`) may be overridden by the mapping's own keys, as YAML intends.
    """

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            first_line: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    earlier = first_line.setdefault(key, key_node.start_mark.line + 1)
                except TypeError:  # an unhashable key: the base class reports it
                    continue
                if earlier != key_node.start_mark.line + 1:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key!r} (first at line {earlier})", key_node.start_mark)
        return super().construct_mapping(node, deep)


# YAML 1.1 (PyYAML) reads a float only with a dot: an unquoted `1e-4` or `5E+3` would be the string '1e-4', which
# the strict config then refuses. YAML 1.2's float rule (the dot optional before an exponent) reads them as numbers.
UniqueKeyLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."))


def yaml_load_unique(text: str) -> Any:
    """yaml.safe_load, except that a repeated mapping key raises a yaml.YAMLError naming the key and line."""
    return yaml.load(text, Loader=UniqueKeyLoader)  # noqa: S506 (a SafeLoader subclass)


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> PipelineConfig:
    """Load a YAML config; `overrides` maps dotted names to values (`{"training.beta": 0.2}`)."""
    try:
        data = yaml_load_unique(Path(path).read_text()) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not a valid config file: {error}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    for dotted, value in (overrides or {}).items():
        section = data
        *parents, leaf = dotted.split(".")
        for depth, name in enumerate(parents):
            section = section.setdefault(name, {})
            if not isinstance(section, dict):
                where = ".".join(parents[: depth + 1])
                raise ConfigError(f"{dotted}: {where} is a value ({section!r}), not a section with fields")
        section[leaf] = value
    return parse_config(data)


def dump_config(config: PipelineConfig) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
