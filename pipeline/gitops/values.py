"""Helm values in the GitOps repo: round-trip edits that keep every untouched byte, Helm's merge, the schema check.

Pure functions of text: no Git, no files written. The repo module calls them before anything is committed.
"""

from __future__ import annotations

import difflib
import json
from io import StringIO
from pathlib import Path
from typing import Any

import jsonschema
from ruamel.yaml import YAML
from ruamel.yaml.error import YAMLError
from ruamel.yaml.scalarstring import ScalarString

from pipeline.errors import TerminalError
from pipeline.secrets import redact


def _yaml(text: str) -> YAML:
    """A round-trip YAML that writes back in the file's own indentation, quotes and line widths."""
    yaml = YAML(typ="rt")
    yaml.preserve_quotes = True
    yaml.width = 4096
    mapping, offset, key_indent = 2, 2, None
    for raw in text.splitlines():
        body = raw.lstrip(" ")
        if not body or body.startswith("#"):
            continue
        indent = len(raw) - len(body)
        if body.startswith("- ") and key_indent is not None:
            offset = indent - key_indent
            break
        key_indent = indent if body.split("#")[0].rstrip().endswith(":") else None
    indents = [len(r) - len(r.lstrip(" ")) for r in text.splitlines() if r.strip() and not r.lstrip().startswith("-")]
    mapping = min([i for i in indents if i > 0], default=2)
    yaml.indent(mapping=mapping, sequence=offset + 2, offset=offset)
    return yaml


def get_key(data: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(data, dict) or part not in data:
            return None
        data = data[part]
    return data


def edit_values(text: str, changes: dict[str, Any]) -> str:
    """Set dotted keys in a YAML document, keeping every other byte: comments, order, quoting, layout.

    Raises:
        TerminalError: the text is not a YAML mapping.
    """
    yaml = _yaml(text)
    try:
        doc = yaml.load(text)
        normalized = _dump(yaml, doc)  # the same document as ruamel writes it, before any change
    except YAMLError as exc:
        raise TerminalError(f"values file is not valid YAML: {exc}", hint="fix the file in the GitOps repo") from None
    if not isinstance(doc, dict):
        raise TerminalError("values file is not a YAML mapping", hint="fix the file in the GitOps repo")
    touched = False
    for dotted, value in changes.items():
        *parents, key = dotted.split(".")
        node = doc
        for part in parents:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        old = node.get(key)
        if key in node and old == value:
            continue
        node[key] = type(old)(value) if isinstance(old, ScalarString) and isinstance(value, str) else value
        touched = True
    if not touched:
        return text
    return _splice(text, normalized, _dump(yaml, doc))


def _dump(yaml: YAML, doc: Any) -> str:
    buffer = StringIO()
    yaml.dump(doc, buffer)
    return buffer.getvalue()


def _splice(original: str, before: str, after: str) -> str:
    """Apply the change ``before -> after`` (both as ruamel writes them) to ``original`` line by line.

    ruamel normalizes some layout on output (spacing after colons and in flow collections, ``~``, indentation
    of nested maps); lines the change does not touch are taken from ``original`` so they keep every byte. When
    the line structure differs, or the splice would not mean the same data, ruamel's output is used as is.
    """
    if original == before:
        return after
    old, base, new = (t.splitlines(keepends=True) for t in (original, before, after))
    if len(old) != len(base):
        return after
    spliced: list[str] = []
    for tag, i1, i2, j1, j2 in difflib.SequenceMatcher(None, base, new, autojunk=False).get_opcodes():
        spliced += old[i1:i2] if tag == "equal" else new[j1:j2]
    result = "".join(spliced)
    safe = YAML(typ="safe")
    try:
        same = safe.load(result) == safe.load(after)
    except YAMLError:
        same = False
    return result if same else after


def helm_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Merge values as Helm does: maps merge key by key, anything else replaces, and a null removes the key."""
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = helm_merge(merged[key], value)
        else:
            merged[key] = value
    return {key: value for key, value in merged.items() if value is not None}


def check_values(text: str, chart_dir: Path, where: str) -> dict[str, Any]:
    """The values Helm would render with (chart defaults + ``text``), validated against values.schema.json.

    Raises:
        TerminalError: the values break the schema; every problem is named, with its key path.
    """
    safe = YAML(typ="safe")
    env_values = safe.load(text) or {}
    chart_values = safe.load((chart_dir / "values.yaml").read_text(encoding="utf-8")) or {}
    merged = helm_merge(chart_values, env_values)
    schema = json.loads((chart_dir / "values.schema.json").read_text(encoding="utf-8"))
    validator = jsonschema.validators.validator_for(schema)(schema)
    problems = sorted(
        f"{'.'.join(str(p) for p in e.absolute_path) or '(top level)'}: {e.message}"
        for e in validator.iter_errors(merged)
    )
    if problems:
        raise TerminalError(
            f"{where}: {len(problems)} value(s) break the chart's values.schema.json: " + redact("; ".join(problems)),
            hint="fix the promotion's inputs (or the values file); nothing was written or committed",
        )
    return merged


def scale_changes(text: str, replicas: int) -> dict[str, Any]:
    """The values keys that size an environment for ``replicas`` at peak: ``replicas``, or, where this values
    file turns KEDA on (``autoscaling.enabled``), KEDA's ``autoscaling.maxReplicas`` (and ``minReplicas`` when it
    is above that, or unset with one replica), since the Rollout's own count is ignored then.

    Raises:
        TerminalError: ``replicas`` is below 1, or the text is not a YAML mapping.
    """
    if replicas < 1:
        raise TerminalError(f"cannot size an environment for {replicas} replicas", hint="at least 1 is needed")
    try:
        doc = YAML(typ="safe").load(text) or {}
    except YAMLError as exc:
        raise TerminalError(f"values file is not valid YAML: {exc}", hint="fix the file in the GitOps repo") from None
    if not isinstance(doc, dict):
        raise TerminalError("values file is not a YAML mapping", hint="fix the file in the GitOps repo")
    if get_key(doc, "autoscaling.enabled") is not True:
        return {"replicas": replicas}
    changes: dict[str, Any] = {"autoscaling.maxReplicas": replicas}
    low = get_key(doc, "autoscaling.minReplicas")  # unset: the chart's default (at least 1) applies
    if (isinstance(low, int) and low > replicas) or (low is None and replicas == 1):
        changes["autoscaling.minReplicas"] = replicas
    return changes


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict) and data:
        flat: dict[str, Any] = {}
        for key, value in data.items():
            flat.update(flatten(value, f"{prefix}{key}."))
        return flat
    return {prefix.rstrip("."): data}
