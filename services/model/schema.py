"""Typed, documented spec fields: one declaration gives parsing, validation, defaults and OpenAPI.

A spec section is a frozen dataclass whose fields are declared with `spec_field(...)`. From it:
`parse(cls, data, path)` builds the object or collects one `FieldError` per problem (with the
field path and what is allowed), and `openapi(cls)` emits the structural schema the CRD uses,
so the manifest a user writes locally and the one the API server checks can never drift.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import re
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Union


@dataclass(frozen=True)
class FieldError:
    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


class SpecError(ValueError):
    """A manifest with one or more problems; `errors` lists them all."""

    def __init__(self, errors: list[FieldError]):
        self.errors = errors
        super().__init__("\n".join(str(e) for e in errors))


def spec_field(default: Any = dataclasses.MISSING, *, doc: str | Callable[[], str], minimum: float | None = None,
               maximum: float | None = None, enum: tuple[str, ...] | Callable[[], tuple[str, ...]] | None = None,
               free_form: bool = False, default_factory: Any = dataclasses.MISSING) -> Any:
    """A spec field: `doc` is what `kubectl explain` shows; bounds and enums are enforced. `doc` and `enum`
    may be functions, called when needed: the values a registry (e.g. of source kinds) holds."""
    meta = {"doc": doc, "minimum": minimum, "maximum": maximum, "enum": enum, "free_form": free_form}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _meta(meta: Any, key: str) -> Any:
    """A field's `doc` or `enum`, called if given as a function."""
    value = meta.get(key)
    return value() if callable(value) else value


def camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part.title() for part in rest)


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    if typing.get_origin(tp) in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], True
    return tp, False


_TYPE_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}
_ITEM_NAMES = {int: "integers", str: "strings"}  # the item types a list field may have


def did_you_mean(word: Any, allowed) -> str:
    """' (did you mean X?)' with the allowed name closest to a misspelled one, or '' when none is close."""
    close = difflib.get_close_matches(str(word), [str(a) for a in allowed], n=1)
    return f" (did you mean {close[0]}?)" if close else ""


_CARRIED = "a finite number that fits in 64 bits (what JSON and the Kubernetes API carry)"


def _carried(value: Any) -> bool:
    """Kubernetes stores integers as int64 and JSON has no NaN or infinity: refuse what it cannot hold."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return True
    return -2**63 <= value < 2**63 if isinstance(value, int) else math.isfinite(value)


def _parse_value(tp: Any, meta: Mapping[str, Any], value: Any, path: str, errors: list[FieldError]) -> Any:
    tp, _ = _unwrap_optional(tp)
    if value is None:
        errors.append(FieldError(path, "must not be null"))
        return None
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return parse(tp, value, path, errors)
    if meta.get("free_form"):
        if not isinstance(value, dict):
            errors.append(FieldError(path, f"must be a mapping, got {type(value).__name__}"))
        return value
    origin = typing.get_origin(tp)
    if origin is list:
        item = typing.get_args(tp)[0]
        if not isinstance(value, list) or not all(isinstance(v, item) and not isinstance(v, bool) for v in value):
            errors.append(FieldError(path, f"must be a list of {_ITEM_NAMES[item]}, got {value!r}"))
            return None
        return list(value)
    if origin is dict:
        if not isinstance(value, dict):
            errors.append(FieldError(path, f"must be a mapping, got {type(value).__name__}"))
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if tp in _TYPE_NAMES and (not isinstance(value, tp) or (tp is not bool and isinstance(value, bool))):
        errors.append(FieldError(path, f"must be {_TYPE_NAMES[tp]}, got {value!r}"))
        return None
    if not _carried(value):
        errors.append(FieldError(path, f"must be {_CARRIED}; got {value!r}"))
        return None
    enum = _meta(meta, "enum")
    if enum and value not in enum:
        errors.append(FieldError(path, f"must be one of {', '.join(enum)}; got {value!r}{did_you_mean(value, enum)}"))
    if meta.get("minimum") is not None and value < meta["minimum"]:
        errors.append(FieldError(path, f"must be >= {meta['minimum']:g}, got {value!r}"))
    if meta.get("maximum") is not None and value > meta["maximum"]:
        errors.append(FieldError(path, f"must be <= {meta['maximum']:g}, got {value!r}"))
    return value


def parse(cls: type, data: Any, path: str, errors: list[FieldError] | None = None) -> Any:
    """Build `cls` from a manifest mapping (camelCase keys); raise SpecError at the top level."""
    top = errors is None
    if errors is None:
        errors = []
    if data is None:
        data = {}
    if not isinstance(data, dict):
        errors.append(FieldError(path, f"must be a mapping, got {type(data).__name__}"))
        data = {}
    hints = typing.get_type_hints(cls)
    fields = {camel(f.name): f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            errors.append(FieldError(f"{path}.{key}", f"unknown field{did_you_mean(key, fields)}; "
                                                       f"allowed: {', '.join(fields)}"))
    values = {}
    for key, f in fields.items():
        if key in data:
            values[f.name] = _parse_value(hints[f.name], f.metadata, data[key], f"{path}.{key}", errors)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            errors.append(FieldError(f"{path}.{key}", "is required"))
    if top and errors:
        raise SpecError(errors)
    if errors:
        return None
    return cls(**values)


def to_manifest(obj: Any) -> Any:
    """The inverse of `parse`: camelCase mappings with every default filled in."""
    if dataclasses.is_dataclass(obj):
        return {camel(f.name): to_manifest(getattr(obj, f.name)) for f in dataclasses.fields(obj)
                if getattr(obj, f.name) is not None}
    return obj


_OPENAPI_TYPES = {int: "integer", float: "number", str: "string", bool: "boolean"}


def openapi(cls: type) -> dict:
    """Structural OpenAPI v3 schema (as the CRD wants it) for a spec dataclass."""
    hints = typing.get_type_hints(cls)
    props, required = {}, []
    for f in dataclasses.fields(cls):
        tp, optional = _unwrap_optional(hints[f.name])
        meta = f.metadata
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):
            schema = openapi(tp)
        elif meta.get("free_form") or typing.get_origin(tp) is dict:
            schema = {"type": "object", "x-kubernetes-preserve-unknown-fields": True}
        elif typing.get_origin(tp) is list:
            schema = {"type": "array", "items": {"type": _OPENAPI_TYPES[typing.get_args(tp)[0]]}}
        else:
            schema = {"type": _OPENAPI_TYPES[tp]}
        schema["description"] = _meta(meta, "doc")
        for key in ("minimum", "maximum"):
            if meta.get(key) is not None:
                schema[key] = meta[key]
        if meta.get("enum"):
            schema["enum"] = list(_meta(meta, "enum"))
        default = f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
        # An empty default says nothing, and Kubernetes 1.20 reads an empty string as null and refuses it.
        if default not in (dataclasses.MISSING, None, "", {}, []) and not dataclasses.is_dataclass(tp):
            schema["default"] = default
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING and not optional:
            required.append(camel(f.name))
        props[camel(f.name)] = schema
    out = {"type": "object", "description": (cls.__doc__ or "").strip(), "properties": props}
    if required:
        out["required"] = required
    return out


# Kubernetes' rules for the strings that end up in object names and labels (apimachinery's validation).
DNS_1035_LABEL = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
DNS_1123_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
LABEL_VALUE = re.compile(r"(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?")
LABEL_NAME = re.compile(r"([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]")


def is_label_key(key: str) -> bool:
    """A label key: an optional DNS subdomain prefix (<= 253) and '/', then a name of 1 to 63 characters."""
    prefix, _, name = key.rpartition("/")
    return (not prefix or (len(prefix) <= 253 and DNS_1123_SUBDOMAIN.fullmatch(prefix) is not None)) \
        and len(name) <= 63 and LABEL_NAME.fullmatch(name) is not None


def markdown_reference(cls: type, path: str = "spec") -> str:
    """The manifest reference table of the README (`make crd` rewrites it there)."""
    def rows(node: dict, prefix: str):
        for key, prop in node.get("properties", {}).items():
            name = f"{prefix}.{key}"
            if "properties" in prop:
                yield name, "object", "", prop["description"]
                yield from rows(prop, name)
                continue
            kind = " \\| ".join(prop["enum"]) if "enum" in prop else prop["type"]
            bounds = [f"{op} {prop[k]:g}" for k, op in (("minimum", ">="), ("maximum", "<=")) if k in prop]
            kind += f" ({', '.join(bounds)})" if bounds else ""
            value = prop.get("default", "")
            default = f"`{value if isinstance(value, str) else json.dumps(value)}`" if value != "" else ""
            yield name, kind, default, prop["description"]
    lines = ["| field | type | default | meaning |", "|---|---|---|---|"]
    lines += [f"| `{n}` | {k} | {d} | {doc} |" for n, k, d, doc in rows(openapi(cls), path)]
    return "\n".join(lines) + "\n"
