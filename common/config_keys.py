"""The flattener of fedward's configuration: flat keys (TOML keys, CLI flags, Flower's run config
and messages: `rounds = 5`, `--target-epsilon 3`, `target-epsilon`) <-> typed groups of fields.

A group (`ConfigGroup`) holds the fields of one concern; a composite (`RunSpec`, `LocalRun`,
`RunConfig`, common/config.py) holds groups as its fields. Every flat key is derived from the
groups' fields, never listed by hand, and a bad value raises `ConfigError` naming the field.
"""

from __future__ import annotations

import difflib
import json
import tomllib
from collections.abc import Collection
from pathlib import Path
from typing import Any, Self

from pydantic import BaseModel, ConfigDict, ValidationError
from pydantic.fields import FieldInfo

from fedward.common.errors import ConfigError

#: Flat keys renamed since an earlier version: an old key is refused, naming the new one.
RENAMED = {"epsilon": "target_epsilon"}


class ConfigGroup(BaseModel):
    """Fields of one concern. A field's flat name (TOML key, CLI flag, Flower key) is its alias
    where it has one (`TaskSpec.name` is `task`), else its own name."""

    model_config = ConfigDict(
        extra="forbid", validate_assignment=True, frozen=False, populate_by_name=True
    )

    @classmethod
    def build(cls, values: dict[str, Any], source: str = "config") -> Self:
        """Validate `values` (flat keys, with '-' or '_'); a bad value raises `ConfigError`."""
        return build(cls, values, source)

    def values_of(self, group: type[BaseModel]) -> dict[str, Any]:
        """This object's values of `group`'s fields (a copy)."""
        return {name: getattr(self, name) for name in group.model_fields}


def nested_groups(cls: type[BaseModel]) -> set[str]:
    """The names of the groups a composite nests, at any depth (`spec`, `federation`, ...): what
    a validation error's location starts with before the field a user wrote."""
    if issubclass(cls, ConfigGroup):
        return set()
    return {
        name
        for name, group in _composite_groups(cls).items()
        for name in (name, *nested_groups(group))
    }


def _composite_groups(cls: type[BaseModel]) -> dict[str, type[BaseModel]]:
    """A composite's (`RunSpec`, `RunConfig`) fields: name -> the group class it holds."""
    return {name: field.annotation for name, field in cls.model_fields.items()}


def flat_fields(cls: type[BaseModel]) -> dict[str, FieldInfo]:
    """Flat name -> field, for a group or (recursively) a composite."""
    if issubclass(cls, ConfigGroup):
        return {field.alias or name: field for name, field in cls.model_fields.items()}
    return {
        key: field
        for group in _composite_groups(cls).values()
        for key, field in flat_fields(group).items()
    }


def flat_names(cls: type[BaseModel]) -> tuple[str, ...]:
    """The flat names (TOML keys, flags without '--', Flower keys with '-') of a group or a
    composite, in order."""
    return tuple(flat_fields(cls))


def flatten(value: BaseModel) -> dict[str, Any]:
    """A group or composite as one flat dict under the flat names."""
    if isinstance(value, ConfigGroup):
        return value.model_dump(by_alias=True)
    flat: dict[str, Any] = {}
    for name in type(value).model_fields:
        flat.update(flatten(getattr(value, name)))
    return flat


def nest(cls: type[BaseModel], values: dict[str, Any]) -> dict[str, Any]:
    """Flat keys of a composite's groups moved into those groups; a key naming a group with a
    dict or model as its value is that group; other keys stay (validation names them)."""
    owner = {
        key: name for name, group in _composite_groups(cls).items() for key in flat_names(group)
    }
    nested: dict[str, Any] = {}
    for key, value in values.items():
        key = key.replace("-", "_")
        if key in cls.model_fields and isinstance(value, dict | BaseModel):
            nested[key] = _merge(nested.get(key), value)
        elif key in owner:
            nested[owner[key]] = _merge(nested.get(owner[key]), {key: value})
        else:
            nested[key] = value
    return nested


def _merge(existing: Any, new: dict[str, Any] | BaseModel) -> dict[str, Any] | BaseModel:
    if existing is None:
        return new
    as_dict = [flatten(item) if isinstance(item, BaseModel) else item for item in (existing, new)]
    return {**as_dict[0], **as_dict[1]}


def group_value(values: dict[str, Any], group: str, name: str, flat: str | None = None) -> Any:
    """The value of field `name` (flat name `flat`) in `values[group]`, a dict or a model."""
    held = values.get(group)
    if isinstance(held, BaseModel):
        return getattr(held, name)
    if isinstance(held, dict):
        return held.get(name, held.get(flat or name))
    return None


def with_value(held: Any, name: str, value: Any) -> dict[str, Any] | BaseModel:
    """A group value (dict, model or None) with field `name` set to `value`."""
    if isinstance(held, BaseModel):
        return held.model_copy(update={name: value})
    return {**(held or {}), name: value}


def to_flower(value: BaseModel) -> dict[str, bool | int | float | str]:
    """Flat scalar form for Flower's run config and ConfigRecord ('-' keys; lists as JSON;
    None dropped)."""
    flat: dict[str, bool | int | float | str] = {}
    for key, item in flatten(value).items():
        if item is None:
            continue
        flat[key.replace("_", "-")] = json.dumps(item) if isinstance(item, list) else item
    return flat


def parse_flat(values: dict[str, Any], fields: dict[str, FieldInfo]) -> dict[str, Any]:
    """Flower's flat scalar config back to field values ("" is unset, lists are JSON); keys
    that are not flat names here are dropped, renamed ones kept so that they are refused."""
    parsed: dict[str, Any] = {}
    for key, value in values.items():
        name = key.replace("-", "_")
        if name in RENAMED:
            parsed[name] = value
            continue
        if name not in fields:
            continue  # Flower's own keys (e.g. partition-id), or another object's fields
        if value == "" and fields[name].default is None:
            continue  # "" stands for "unset" in Flower's scalar-only config
        if isinstance(value, str) and value.startswith(("[", "null")):
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                pass
        parsed[name] = value
    return parsed


def refuse_renamed(values: dict[str, Any], source: str) -> None:
    """`ConfigError` naming the new key for a key renamed since an earlier version."""
    for key in values:
        new = RENAMED.get(key.replace("-", "_"))
        if new is not None:
            raise ConfigError(
                f"{source}: '{key}' is now called '{new}' (TOML: {new} = ..., flag: "
                f"--{new.replace('_', '-')}); rename it"
            )


def build(cls: type[BaseModel], values: dict[str, Any], source: str) -> Any:
    """Validate flat (or nested) `values` into `cls`; `ConfigError` naming the field otherwise."""
    normalised = {key.replace("-", "_"): value for key, value in values.items()}
    refuse_renamed(normalised, source)
    try:
        return cls(**normalised)
    except ValidationError as exc:
        groups = nested_groups(cls)
        raise ConfigError(describe_invalid(exc, source, "", flat_names(cls), groups)) from None


def read_toml(path: str | Path, what: str, flag: str) -> dict[str, Any]:
    """A TOML file as a dict; `ConfigError` naming the file (and the flag to fix) otherwise."""
    path = Path(path)
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: {what} not found; check the {flag} path") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read {what} ({exc})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: {what} is not valid TOML ({exc})") from None


def describe_invalid(
    exc: ValidationError, source: str, what: str, known, groups: Collection[str] = ()
) -> str:
    """One line naming every invalid field of a pydantic model, what was wrong and the value;
    `groups`: the names of the groups it nests (`nested_groups`), left out of a field's name."""
    parts = []
    for error in exc.errors():
        loc = list(error["loc"])
        while loc and loc[0] in groups and (len(loc) > 1 or error["type"] == "value_error"):
            loc = loc[1:]  # the flat name is what a user wrote (`rounds`, not `federation.rounds`)
        field = ".".join(str(item) for item in loc)
        if error["type"] == "extra_forbidden":
            nearest = difflib.get_close_matches(field, list(known), n=3, cutoff=0.6)
            hint = (
                f"did you mean {' or '.join(repr(name) for name in nearest)}?"
                if nearest
                else "no known field has a similar name; check the spelling"
            )
            parts.append(f"unknown field '{field}' ({hint})")
            continue
        if error["type"] == "missing":
            parts.append(f"field '{field}' is required")
            continue
        given = error.get("input")
        shown = "" if isinstance(given, dict) else f" (got {given!r})"
        message = error["msg"].removeprefix("Value error, ")
        parts.append(f"field '{field}': {message}{shown}" if field else message)
    return f"{source}: invalid {what + ': ' if what else ''}" + "; ".join(parts)
