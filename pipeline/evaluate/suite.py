"""Eval suites: ``evaluations/suites/<name>.yaml`` -> a validated :class:`Suite` (lm-eval tasks + gate policy).

A suite names lm-eval tasks (built-in ones, or local task YAMLs under its ``include_path``), how to run each
(few-shot, limit) and, per metric key as lm-eval reports it (``acc,none``, ``exact_match,strict-match``), the
gate policy: how far the candidate may fall below the baseline, an absolute floor, and the stderr rule.
Everything is validated on load; every finding names the file, the line and the key.

Example:
    >>> suite = load_suite("smoke")  # doctest: +SKIP
    >>> suite.tasks["facts_mc"].metrics["acc,none"].floor
    0.9
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator

from pipeline.config import describe_error, problem_line, read_yaml
from pipeline.errors import ConfigError
from pipeline.evaluate.tasks import EVALUATIONS_DIR

SUITES_DIR = EVALUATIONS_DIR / "suites"
METRIC_KEY = r"^[A-Za-z0-9_.\-]+,[A-Za-z0-9_.\-]+$"

NonNegative = Annotated[float, Field(ge=0)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class MetricPolicy(Strict):
    """How one metric is judged. Unset fields fall back to the environment's defaults (``gates.eval.policy``).

    ``max_regression_abs`` is in the metric's own units (0.03 = 3 points of accuracy); ``max_regression_rel`` is
    a fraction of the baseline (0.05 = 5 %); with both, the smaller allowance applies. With ``stderr_k``, a drop
    counts only when it also exceeds ``stderr_k`` x the combined standard error of both runs. ``floor`` is an
    absolute minimum that applies always, and is the whole gate when there is no baseline.
    """

    max_regression_abs: NonNegative | None = None
    max_regression_rel: NonNegative | None = None
    floor: float | None = None
    stderr_k: NonNegative | None = None
    higher_is_better: bool = True


def _metric_key(key: str) -> str:
    if not re.match(METRIC_KEY, key):
        raise ValueError(
            f"metric {key!r} must be 'metric,filter' as lm-eval reports it "
            "(e.g. 'acc,none', 'exact_match,strict-match')"
        )
    return key


MetricKey = Annotated[str, AfterValidator(_metric_key)]


class TaskSpec(Strict):
    """One lm-eval task in a suite: how to run it and which metrics the gate reads."""

    num_fewshot: Annotated[int, Field(ge=0)] | None = None
    limit: Annotated[int, Field(gt=0)] | None = Field(None, description="evaluate only the first N documents")
    metrics: dict[MetricKey, MetricPolicy] = Field(min_length=1)


class Suite(Strict):
    """A validated suite. ``path`` is the file it came from; ``include_path`` is resolved to an absolute folder."""

    name: str
    description: str = ""
    include_path: str | None = Field(None, description="folder of local task YAMLs, relative to the suite file")
    tasks: dict[str, TaskSpec] = Field(min_length=1)
    path: str = Field("", exclude=True)
    sha256: str = Field("", exclude=True, description="hash of the suite file and every local task file it uses")

    @model_validator(mode="after")
    def _include_exists(self) -> Suite:
        if self.include_path is not None and not Path(self.include_path).is_dir():
            raise ValueError(f"include_path {self.include_path!r} is not a folder")
        return self

    def metric_keys(self) -> list[tuple[str, str]]:
        """Every (task, metric) the gate judges, in suite order."""
        return [(task, metric) for task, spec in self.tasks.items() for metric in spec.metrics]


def suite_path(name_or_path: str | Path) -> Path:
    """A suite name (``smoke``) means ``evaluations/suites/smoke.yaml``; anything with a slash or suffix is a path."""
    text = str(name_or_path)
    if "/" in text or text.endswith((".yaml", ".yml")):
        return Path(text)
    return SUITES_DIR / f"{text}.yaml"


def _content_hash(text: str, include: Path | None) -> str:
    """Hash of the suite's text and, when it has local tasks, every file under its include path (YAMLs and data)."""
    digest = hashlib.sha256(text.encode())
    if include is not None:
        for file in sorted(p for p in include.rglob("*") if p.is_file() and "__pycache__" not in p.parts):
            digest.update(str(file.relative_to(include)).encode() + b"\0")
            digest.update(hashlib.sha256(file.read_bytes()).digest())
    return digest.hexdigest()


def parse_suite(text: str, path: Path) -> Suite:
    """Validate suite text; ``path`` names the file in messages and anchors ``include_path``.

    Raises:
        ConfigError: not YAML, or not a valid suite (every problem names the file, line and key).
    """
    shown = str(path)
    doc = read_yaml(text, shown)
    if not isinstance(doc, dict):
        raise ConfigError(shown, [f"{shown}: expected a mapping with 'tasks' at the top level"])
    data = dict(doc)
    data.setdefault("name", path.stem)
    if isinstance(data.get("include_path"), str):
        data["include_path"] = str((path.parent / data["include_path"]).resolve())
    hint = "see evaluations/suites/smoke.yaml for every key and its expected form"
    try:
        suite = Suite.model_validate(data)
    except ValidationError as exc:
        problems = [
            problem_line(
                shown, doc, tuple(e["loc"]), describe_error(dict(e)).replace("see examples/", "see the shipped suites")
            )
            for e in exc.errors()
        ]
        raise ConfigError(shown, problems, hint=hint) from None
    include = Path(suite.include_path) if suite.include_path else None
    return suite.model_copy(update={"path": shown, "sha256": _content_hash(text, include)})


def load_suite(name_or_path: str | Path) -> Suite:
    """Read and validate a suite by name (``evaluations/suites/<name>.yaml``) or path.

    Raises:
        ConfigError: the file is missing, unreadable, not YAML, or not a valid suite.
    """
    path = suite_path(name_or_path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        known = ", ".join(sorted(p.stem for p in SUITES_DIR.glob("*.yaml"))) or "none"
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
        raise ConfigError(
            str(path),
            [f"{path}: cannot read the suite: {reason}"],
            hint=f"name a suite in {SUITES_DIR} (known: {known}) or pass the path of a suite YAML",
        ) from None
    return parse_suite(text, path)
