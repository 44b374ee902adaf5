"""Reading a job: the YAML file (a strict loader) and dotted-key overrides from the command line.

The loader reads ``pattern: 2:4`` as the string ``"2:4"`` (plain PyYAML would read YAML 1.1 sexagesimal
``124``) and ``1e-3`` as a number (plain PyYAML: a string). Duplicate keys are errors.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Iterable, Mapping

import yaml

from pipeline.jobmessages import JobError, show

__all__ = ["apply_overrides", "parse_overrides", "read_yaml"]


class _JobLoader(yaml.SafeLoader):
    """SafeLoader without YAML 1.1 sexagesimal numbers ('2:4' stays a string), with '1e-3' as a float and
    duplicate keys rejected."""


_INT = "tag:yaml.org,2002:int"
_FLOAT = "tag:yaml.org,2002:float"
_JobLoader.yaml_implicit_resolvers = {
    ch: [(tag, rx) for tag, rx in resolvers if tag not in (_INT, _FLOAT)]
    for ch, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_JobLoader.add_implicit_resolver(
    _INT,
    re.compile(r"^(?:[-+]?0b[0-1_]+|[-+]?0x[0-9a-fA-F_]+|[-+]?0[0-7_]+|[-+]?(?:0|[1-9][0-9_]*))$"),
    list("-+0123456789"),
)
_JobLoader.add_implicit_resolver(
    _FLOAT,
    re.compile(
        r"^(?:[-+]?[0-9][0-9_]*(?:\.[0-9_]*(?:[eE][-+]?[0-9]+)?|[eE][-+]?[0-9]+)"
        r"|[-+]?\.[0-9_]+(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"
    ),
    list("-+0123456789."),
)


def _construct_mapping_no_dups(loader: _JobLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    loader.flatten_mapping(node)
    seen: dict[Any, Any] = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark
            )
        seen[key] = loader.construct_object(value_node, deep=deep)
    return seen


_JobLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping_no_dups)


def _yaml_load(text: str) -> Any:
    return yaml.load(text, Loader=_JobLoader)  # noqa: S506 -- a SafeLoader subclass


def read_yaml(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a job YAML file into a dict (JobError on a missing file, bad YAML or a non-mapping document)."""
    where = f"job file {path}"
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise JobError(f"{where}: not found") from None
    except OSError as e:
        raise JobError(f"{where}: cannot read ({e.strerror or e})") from None
    try:
        data = _yaml_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
        at_line = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise JobError(f"{where}: invalid YAML{at_line}: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise JobError(f"{where}: expected a mapping of sections (model, calibration, pruning, ...), got {show(data)}")
    return data


def parse_overrides(items: Iterable[str]) -> dict[str, Any]:
    """``["pruning.alpha=0.2", "evaluation.zero_shot.tasks=[piqa, boolq]"]`` -> dotted-key dict.

    Values are parsed as YAML scalars/lists (``0.2`` -> float, ``null`` -> None, ``auto`` -> "auto")."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise JobError(f"override {item!r}: expected KEY=VALUE, e.g. pruning.alpha=0.2")
        key, _, raw = item.partition("=")
        key = key.strip()
        if not key:
            raise JobError(f"override {item!r}: empty key")
        try:
            value = _yaml_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        out[key] = value
    return out


def apply_overrides(data: dict[str, Any], overrides: Mapping[str, Any] | None) -> dict[str, Any]:
    """Return a copy of data with dotted-key overrides applied (``{"pruning.alpha": 0.2}``).

    Missing intermediate sections are created; unknown keys are left for validation to report."""
    out = json.loads(json.dumps(data, default=str)) if data else {}
    for dotted, value in (overrides or {}).items():
        parts = [p for p in str(dotted).split(".") if p]
        if not parts:
            raise JobError(f"override {dotted!r}: empty key")
        node = out
        for i, part in enumerate(parts[:-1]):
            nxt = node.get(part)
            if nxt is None:
                nxt = node[part] = {}
            elif not isinstance(nxt, dict):
                prefix = ".".join(parts[: i + 1])
                raise JobError(f"override '{dotted}': '{prefix}' is {show(nxt)}, not a section")
            node = nxt
        node[parts[-1]] = value
    return out
