"""EvalReport: what an evaluation measured, task -> metric -> (value, stderr, n), independent of lm-eval's layout.

A report is what the gate reads, what the result cache stores, and what a PromotionRecord keeps as the next
promotion's baseline. :func:`load_baseline` reads either a bare report or a PromotionRecord that carries one.
"""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pipeline.errors import TerminalError, first_problem

if TYPE_CHECKING:  # the record holds an EvalReport: importing it at run time would be a cycle
    from pipeline.record import PromotionRecord


class MetricValue(BaseModel):
    """One measured metric: its value, its standard error (None when lm-eval computed none), and the sample count."""

    model_config = ConfigDict(frozen=True)

    value: float
    stderr: float | None = None
    n: int | None = None


class EvalReport(BaseModel):
    """The scores of one model (artifact or endpoint) on one suite, with what identifies the run."""

    suite: str
    suite_sha256: str
    subject: str = Field(description="what was evaluated: an artifact id, or 'endpoint URL model NAME'")
    backend: str = Field(description="hf, vllm, local-completions and/or local-chat-completions")
    lm_eval_version: str
    tasks: dict[str, dict[str, MetricValue]]
    seconds: float = 0.0
    created_at: datetime = Field(default_factory=lambda: datetime.now(UTC))
    skipped: bool = Field(False, exclude=True, description="true when this call found the result in the cache")

    def metric(self, task: str, metric: str) -> MetricValue | None:
        """The value of ``metric`` (``acc,none``) for ``task``, or None when it was not measured."""
        return self.tasks.get(task, {}).get(metric)

    def rows(self) -> list[tuple[str, str, MetricValue]]:
        """Every (task, metric, value), sorted, for tables."""
        return [(t, m, v) for t in sorted(self.tasks) for m, v in sorted(self.tasks[t].items())]


def _number(value: Any) -> float | None:
    """A finite float from lm-eval's value (it mixes floats, numpy scalars and the string 'N/A')."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def metrics_from_results(results: dict[str, Any], tasks: list[str]) -> dict[str, dict[str, MetricValue]]:
    """Turn lm-eval's ``simple_evaluate`` output into task -> metric -> MetricValue for ``tasks``.

    lm-eval reports ``acc,none`` beside ``acc_stderr,none`` in ``results`` (groups such as mmlu in ``groups``
    too) and the documents used in ``n-samples``; anything that is not a number is left out.
    """
    merged: dict[str, Any] = {**results.get("results", {}), **results.get("groups", {})}
    samples = results.get("n-samples", {})
    found: dict[str, dict[str, MetricValue]] = {}
    for task in tasks:
        row = merged.get(task, {})
        n_info = samples.get(task, {})
        n = n_info.get("effective") if isinstance(n_info, dict) else None
        if n is None:
            n = row.get("sample_len") or row.get("sample_count")
        if n is None and task in results.get("group_subtasks", {}):  # a group (mmlu): the sum of its tasks
            counts = [samples.get(sub, {}).get("effective") for sub in results["group_subtasks"][task]]
            n = sum(c for c in counts if isinstance(c, int)) or None
        metrics: dict[str, MetricValue] = {}
        for key, raw in row.items():
            if "," not in key or "_stderr," in key:
                continue
            value = _number(raw)
            if value is None:
                continue
            name, _, filt = key.partition(",")
            stderr = _number(row.get(f"{name}_stderr,{filt}"))
            metrics[key] = MetricValue(value=value, stderr=stderr, n=int(n) if n is not None else None)
        found[task] = metrics
    return found


def load_baseline(path: str | Path) -> EvalReport:
    """Read a baseline: an EvalReport JSON (``--output``, or ``--json``'s output), or a PromotionRecord that has one.

    Raises:
        TerminalError: the file is missing, not JSON, or holds neither a report nor a record with one.
    """
    file = Path(path)
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise TerminalError(
            f"baseline {file} does not exist",
            hint="pass the EvalReport JSON of the incumbent (written by `modelctl evaluate --output`) or the "
            "environment's current PromotionRecord; leave --baseline out to judge by the suite's floors",
        ) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TerminalError(
            f"baseline {file} is not readable JSON ({type(exc).__name__}: {exc})",
            hint="pass a file written by `modelctl evaluate --output` or a PromotionRecord",
        ) from None
    where = file
    if isinstance(data, dict) and isinstance(data.get("report"), dict) and "tasks" not in data:
        data = data["report"]  # the output of `modelctl evaluate --json`
    is_record = isinstance(data, dict) and "tasks" not in data and ("eval_report" in data or {"id", "env"} <= set(data))
    if is_record:
        if not data.get("eval_report"):
            raise TerminalError(
                f"baseline {file} is a promotion record without an eval report",
                hint="pick the record of a promotion that ran the eval gate, or evaluate the incumbent first",
            )
        data = data["eval_report"]
        where = Path(f"{file} (eval_report)")
    try:
        return EvalReport.model_validate(data)
    except ValidationError as exc:
        raise TerminalError(
            f"baseline {where} is not an EvalReport: {first_problem(exc)}",
            hint="pass a file written by `modelctl evaluate --output` or a PromotionRecord",
        ) from None


def baseline_from_record(record: PromotionRecord | None) -> EvalReport | None:
    """The eval baseline carried by the environment's current PromotionRecord (``GitOpsRepo.baseline(env)``).

    None when there is no record or it holds no eval report: the gate then judges by the suite's floors.

    Raises:
        TerminalError: the record's eval report is not a valid EvalReport.
    """
    if record is None or not record.eval_report:
        return None
    try:
        return EvalReport.model_validate(record.eval_report)
    except ValidationError as exc:
        raise TerminalError(
            f"the eval report in promotion record {record.id} ({record.env}) is not valid: {first_problem(exc)}",
            hint="records are written by modelctl; restore the file from Git history or re-evaluate the incumbent",
        ) from None
