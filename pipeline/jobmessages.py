"""One-line messages for an invalid job: the first offending key, what its field expects (read from the
schema's annotations and bounds) and what was given, unknown keys first with a close match.

    unknown key 'pruning.alhpa' -- did you mean 'alpha'? (valid: allocation, alpha, ...)
    'pruning.sparsity': expected a number in (0, 1), got 'high'
"""

from __future__ import annotations

import difflib
import types
from typing import Annotated, Any, Literal, Mapping, Union, get_args, get_origin

import annotated_types as at
from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo

__all__ = ["JobError", "first_problem", "show"]


class JobError(ValueError):
    """Invalid job file or override. ``str()`` is one line naming the key and the fix."""


def show(value: Any) -> str:
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, (list, tuple)):
        r = repr(list(value))
        return r if len(r) <= 60 else "a list"
    if value is None:
        return "null"
    s = repr(value)
    return s if len(s) <= 60 else s[:57] + "..."


def _unwrap(annotation: Any, metadata: list[Any]) -> tuple[Any, list[Any]]:
    while get_origin(annotation) is Annotated:
        base, *extra = get_args(annotation)
        metadata = list(metadata) + list(extra)
        annotation = base
    flat: list[Any] = []
    for m in metadata:
        if isinstance(m, FieldInfo):
            flat.extend(m.metadata)
        else:
            flat.append(m)
    return annotation, flat


def _bounds(metadata: list[Any]) -> str:
    """The field's constraint as text: `` in [0, 0.5)``, `` >= 1``, ... (from its annotated-types metadata)."""
    lo = hi = None
    for m in metadata:
        for name, side, bracket in (("ge", "lo", "["), ("gt", "lo", "("), ("le", "hi", "]"), ("lt", "hi", ")")):
            value = getattr(m, name, None)
            if value is not None and isinstance(m, (at.Ge, at.Gt, at.Le, at.Lt, at.Interval)):
                if side == "lo":
                    lo = (value, bracket)
                else:
                    hi = (value, bracket)
    if lo and hi:
        return f" in {lo[1]}{lo[0]:g}, {hi[0]:g}{hi[1]}"
    if lo:
        return f" {'>=' if lo[1] == '[' else '>'} {lo[0]:g}"
    if hi:
        return f" {'<=' if hi[1] == ']' else '<'} {hi[0]:g}"
    return ""


def _expected(annotation: Any, metadata: list[Any] | None = None) -> str:
    annotation, metadata = _unwrap(annotation, list(metadata or []))
    origin = get_origin(annotation)
    if origin in (Union, types.UnionType):
        args = get_args(annotation)
        parts = [_expected(a) for a in args if a is not type(None)]
        text = " or ".join(parts)
        return text + " or null" if type(None) in args else text
    if origin is Literal:
        vals = get_args(annotation)
        return repr(vals[0]) if len(vals) == 1 else "one of " + ", ".join(repr(v) for v in vals)
    if origin in (list, tuple, set):
        inner = get_args(annotation)
        what = {str: "strings", int: "integers", float: "numbers"}.get(inner[0] if inner else None, "values")
        return f"a list of {what}"
    if annotation is bool:
        return "true or false"
    if annotation is int:
        return "an integer" + _bounds(metadata)
    if annotation is float:
        return "a number" + _bounds(metadata)
    if annotation is str:
        return "a non-empty string" if any(isinstance(m, at.MinLen) and m.min_length > 0 for m in metadata) else "a string"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "a mapping with keys " + ", ".join(sorted(annotation.model_fields))
    return getattr(annotation, "__name__", str(annotation))


def _resolve_loc(root: type[BaseModel], loc: tuple[Any, ...]) -> tuple[str, FieldInfo | None, type[BaseModel] | None, bool]:
    """Map a pydantic error loc to (dotted key, field info, owning model, is_unknown_key)."""
    model: type[BaseModel] | None = root
    parts: list[str] = []
    info: FieldInfo | None = None
    owner: type[BaseModel] | None = root
    for i, item in enumerate(loc):
        if model is None:
            if isinstance(item, int):
                parts[-1] = f"{parts[-1]}[{item}]"
            continue  # union tags like 'float' / "literal['auto']"
        if not isinstance(item, str):
            break
        if item not in model.model_fields:
            return ".".join(parts + [item]), None, model, True
        parts.append(item)
        owner = model
        info = model.model_fields[item]
        ann, _ = _unwrap(info.annotation, [])
        args = [a for a in (get_args(ann) or (ann,)) if a is not type(None)]
        nested = [a for a in args if isinstance(a, type) and issubclass(a, BaseModel)]
        model = nested[0] if nested and len(args) == 1 else None
    return ".".join(parts), info, owner, False


def _lookup(data: Any, dotted: str) -> tuple[bool, Any]:
    node = data
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return False, None
        node = node[part]
    return True, node


def first_problem(err: ValidationError, root: type[BaseModel], override_keys: set[str],
                  data: Mapping[str, Any] | None = None) -> str:
    """One line for the first offending key of ``root`` (unknown keys first), plus a count of the others."""
    errors = err.errors(include_url=False)
    described: dict[str, str] = {}
    unknown_keys: list[str] = []
    for e in errors:
        key, info, owner, unknown = _resolve_loc(root, tuple(e.get("loc", ())))
        key = key.split("[", 1)[0]  # a bad list item is reported on its field, with the whole value
        if key in described:
            continue
        from_override = key in override_keys or any(k.startswith(key + ".") for k in override_keys)
        source = " (set by override)" if from_override else ""
        if unknown or e.get("type") == "extra_forbidden":
            unknown_keys.append(key)
            name = key.rsplit(".", 1)[-1]
            valid = sorted(owner.model_fields) if owner is not None else []
            close = difflib.get_close_matches(name, valid, n=1, cutoff=0.6)
            hint = f" -- did you mean '{close[0]}'?" if close else ""
            described[key] = f"unknown key '{key}'{source}{hint} (valid: {', '.join(valid)})"
        elif e.get("type") == "missing":
            described[key] = f"'{key}' is required{source}"
        elif e.get("type") == "value_error":  # a validator's own sentence (sizes, paths, sections that clash)
            sentence = (e.get("ctx") or {}).get("error") or e.get("msg")
            described[key] = f"'{key}'{source}: {sentence}" if key else str(sentence)
        elif info is not None:
            expected = _expected(info.annotation, list(info.metadata))
            found, value = _lookup(data, key) if data is not None else (False, None)
            described[key] = f"'{key}'{source}: expected {expected}, got {show(value if found else e.get('input'))}"
        else:
            described[key] = f"'{key or '(top level)'}'{source}: {e.get('msg', 'invalid value')}"
    keys = unknown_keys + [k for k in described if k not in unknown_keys]
    msg = described[keys[0]]
    if len(keys) > 1:
        msg += f" (and {len(keys) - 1} more: {', '.join(repr(k) for k in keys[1:4])}{', ...' if len(keys) > 4 else ''})"
    return msg
