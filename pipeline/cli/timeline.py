"""`modelctl timeline`: a promotion's canary, step by step: the weight, the figures that decided, the decision.

The timeline is the :class:`~pipeline.record.RolloutOutcome` a promotion record keeps: one row per thing the canary
driver did (synced, each check, promote, abort, done, revert) with the canary weight in force, the metrics check's
canary and stable TTFT p95 (from Prometheus) and the verdict. It is read from the GitOps repo (the newest promotion
of the environment, or ``--id``; a reverted canary's timeline is kept in its revert's record), or from a record file
(``--record``: a record, or ``modelctl promote --json``'s output).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from pipeline.cli.render import JsonFlag, WideFlag, emit_json, errors, fit_table, out
from pipeline.record import PromotionRecord, RolloutOutcome, StepEvent

ConfigOption = Annotated[Path, typer.Option("--config", "-c", help="promotion.yaml")]
WorkdirOption = Annotated[
    Path | None, typer.Option(help="the pipeline's clone of the GitOps repo (default: under $MODELCTL_CACHE)")
]
VS_STABLE = "vs stable"  # the metrics check's row comparing the canary with stable (pipeline.checks)


def register(app: typer.Typer) -> None:
    app.command("timeline")(timeline)


def ttft_figures(event: StepEvent) -> tuple[float | None, float | None]:
    """(canary, stable) TTFT p95 in ms from a check event's figures: the canary's from the row comparing it with
    stable (else the canary's own TTFT row), stable's from that row's baseline. (None, None) without figures."""
    found = event.figures or {}
    names = [name for name in found if "ttft" in name.lower() and not name.endswith(" baseline")]
    compared = [name for name in names if VS_STABLE in name]
    canary = next((found[n] for n in compared + names if found.get(n) is not None), None)
    stable = next((found.get(f"{n} baseline") for n in compared if found.get(f"{n} baseline") is not None), None)
    return canary, stable


def timeline_rows(outcome: RolloutOutcome) -> list[dict[str, Any]]:
    """The timeline as plain rows (what ``--json`` prints): every event with its weight, figures and decision."""
    rows = []
    for event in outcome.steps:
        canary, stable = ttft_figures(event)
        rows.append({
            "step": event.at, "action": event.action, "weight": event.weight, "canary_ttft_p95_ms": canary,
            "stable_ttft_p95_ms": stable, "decision": event.verdict or event.action, "figures": event.figures,
            "seconds": event.seconds, "reason": event.reason,
        })  # fmt: skip
    return rows


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f} ms"


def timeline_lines(outcome: RolloutOutcome) -> list[str]:
    """The timeline as plain text lines (for the end of `modelctl promote`): seconds, step, weight, the canary's
    and stable's TTFT p95 from Prometheus where a check read them, and the decision."""
    lines = [f"{'at':>7}  {'step':<10} {'weight':>6}  {'canary p95':>10}  {'stable p95':>10}  decision"]
    for row in timeline_rows(outcome):
        weight = "-" if row["weight"] is None else f"{row['weight']}%"
        lines.append(
            f"{row['seconds']:>6.0f}s  {str(row['step'])[:10]:<10} {weight:>6}  {_ms(row['canary_ttft_p95_ms']):>10}  "
            f"{_ms(row['stable_ttft_p95_ms']):>10}  {row['decision']}"
        )
    return lines if len(lines) > 1 else []


def timeline_table(outcome: RolloutOutcome, wide: bool = False) -> Table:
    """The canary timeline as a table: step, weight, canary and stable TTFT p95, decision, seconds, why."""
    cells = []
    for row in timeline_rows(outcome):
        cells.append([
            str(row["step"]), "-" if row["weight"] is None else f"{row['weight']}%", _ms(row["canary_ttft_p95_ms"]),
            _ms(row["stable_ttft_p95_ms"]), str(row["decision"]), f"{row['seconds']:.1f}", str(row["reason"]),
        ])  # fmt: skip
    headers = ["step", "weight", "canary TTFT p95", "stable TTFT p95", "decision", "seconds", "why"]
    return fit_table(headers, cells, {"why": 24}, wide)


def _outcome_of(data: Any, where: str) -> tuple[str | None, RolloutOutcome | None]:
    """(promotion id, outcome) from a record file: a PromotionRecord, `modelctl promote --json`'s output (its
    ``record``), or a bare RolloutOutcome.

    Raises:
        TerminalError: none of those.
    """
    from pipeline.errors import TerminalError

    if isinstance(data, dict) and isinstance(data.get("record"), dict):
        data = data["record"]
    if isinstance(data, dict) and "final" in data and "steps" in data:
        return None, RolloutOutcome.model_validate(data)
    if not isinstance(data, dict):
        raise TerminalError(f"{where} is not a promotion record", hint="pass a record's JSON file")
    record = PromotionRecord.from_json(json.dumps(data), where=where)
    return record.id, record.rollout


def _from_git(config: Path, env: str, promotion_id: str | None, workdir: Path | None) -> PromotionRecord:
    """The record of ``promotion_id``, or of the newest promotion of ``env`` (a revert names the one it undid).
    A reverted canary's timeline is in its revert's record (the promotion's own record precedes its canary).

    Raises:
        TerminalError: no promotion in ``env`` yet, or no such record.
    """
    from pipeline.config import load_config
    from pipeline.errors import TerminalError
    from pipeline.gitops import GitOps

    cfg = load_config(config)
    cfg.environment(env)
    repo = GitOps.from_settings(cfg.gitops, workdir)
    if promotion_id is None:
        entry = next((e for e in repo.history(env) if e.action == "promote"), None)
        if entry is None:
            raise TerminalError(f"no promotion to {env} yet in {repo.remote}", hint="promote one first")
        promotion_id = entry.promotion_id
    stored = repo.record(env, promotion_id)
    if stored.rollout is None:
        undone = next((e for e in repo.history(env) if e.action == "revert" and e.reverts == promotion_id), None)
        kept = repo.record(env, undone.promotion_id).rollout if undone is not None else None
        stored = stored.model_copy(update={"rollout": kept}) if kept is not None else stored
    return stored


def timeline(
    env: Annotated[str | None, typer.Option("--env", "-e", help="environment name from promotion.yaml")] = None,
    config: ConfigOption = Path("promotion.yaml"),
    promotion_id: Annotated[str | None, typer.Option("--id", help="a promotion id (default: the newest)")] = None,
    record: Annotated[
        Path | None, typer.Option(help="a record file (or `modelctl promote --json` output) instead of Git")
    ] = None,
    workdir: WorkdirOption = None,
    wide: WideFlag = False,
    as_json: JsonFlag = False,
) -> None:
    """A promotion's canary step by step: weight, canary vs stable TTFT p95 (Prometheus), decision, seconds."""
    from pipeline.errors import TerminalError

    with errors(as_json):
        if record is not None:
            where = str(record)
            try:
                data = json.loads(record.read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                raise TerminalError(f"cannot read {where}: {exc}", hint="pass a record's JSON file") from None
            pid, outcome = _outcome_of(data, where)
        elif env is None:
            raise TerminalError("name an environment or a record", hint="--env sandbox, or --record FILE")
        else:
            stored = _from_git(config, env, promotion_id, workdir)
            pid, outcome, where = stored.id, stored.rollout, f"the record of promotion {stored.id} in Git"
        if outcome is None:
            raise TerminalError(
                f"{where} has no canary timeline (no rollout outcome: a local promotion, or the record was written "
                "before its canary ran)",
                hint="records committed with the promotion precede its canary (a revert's record keeps the reverted "
                "canary's); pass the finished record with --record FILE (the `record` of `modelctl promote --json`)",
            )
    if as_json:
        emit_json({
            "ok": True, "promotion_id": pid, "final": outcome.final, "reason": outcome.reason,
            "steps": timeline_rows(outcome),
        })  # fmt: skip
        return
    out.print(f"canary of promotion {pid or '-'}: {outcome.final}: {outcome.reason}", highlight=False)
    out.print(timeline_table(outcome, wide))
