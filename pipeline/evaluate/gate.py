"""The quality gate: a pure function of (candidate report, baseline report or None, suite policy) -> GateResult.

Every metric the suite names becomes a row. Against a baseline, a metric fails when it falls further below the
baseline than the policy allows (absolute points and/or a fraction of the baseline, the smaller allowance
wins), unless the stderr rule says the drop is within noise (it counts only beyond ``stderr_k`` x the combined
standard error of both runs). A floor applies always; without a baseline it is the whole rule.
"""

from __future__ import annotations

import math

from pipeline.config import EvalPolicy
from pipeline.evaluate.report import EvalReport, MetricValue
from pipeline.evaluate.suite import MetricPolicy, Suite
from pipeline.gates import GateResult, GateRow

GATE_NAME = "eval"


def _fmt(number: float) -> str:
    return f"{number:.4g}"


def effective_policy(policy: MetricPolicy, defaults: EvalPolicy | None) -> MetricPolicy:
    """The metric's policy with the environment's defaults filling what the suite leaves unset."""
    if defaults is None:
        return policy
    fill = {
        key: getattr(defaults, key)
        for key in ("max_regression_abs", "max_regression_rel", "stderr_k")
        if getattr(policy, key) is None and getattr(defaults, key) is not None
    }
    return policy.model_copy(update=fill) if fill else policy


def allowed_regression(policy: MetricPolicy, baseline: float) -> float | None:
    """How far below ``baseline`` the candidate may fall (the smaller of the absolute and relative allowances)."""
    allowances = []
    if policy.max_regression_abs is not None:
        allowances.append(policy.max_regression_abs)
    if policy.max_regression_rel is not None:
        allowances.append(policy.max_regression_rel * abs(baseline))
    return min(allowances) if allowances else None


def combined_stderr(candidate: MetricValue, baseline: MetricValue) -> float | None:
    """sqrt(se_c^2 + se_b^2), treating one missing stderr as 0; None when neither run has one."""
    if candidate.stderr is None and baseline.stderr is None:
        return None
    return math.hypot(candidate.stderr or 0.0, baseline.stderr or 0.0)


def _limit_text(policy: MetricPolicy) -> str:
    parts = []
    worse = "below" if policy.higher_is_better else "above"
    if policy.max_regression_abs is not None:
        parts.append(f"≤ {_fmt(policy.max_regression_abs)} {worse} baseline")
    if policy.max_regression_rel is not None:
        parts.append(f"≤ {policy.max_regression_rel:.1%} {worse} baseline")
    if policy.stderr_k is not None and parts:
        parts.append(f"drops within {_fmt(policy.stderr_k)}×σ ignored")
    if policy.floor is not None:
        parts.append(f"{'≥' if policy.higher_is_better else '≤'} {_fmt(policy.floor)}")
    return "; ".join(parts) or "no rule"


def judge_metric(
    name: str, policy: MetricPolicy, value: MetricValue | None, base: MetricValue | None, note: str = ""
) -> GateRow:
    """One row of the gate: pass, fail or inconclusive, with a reason a person can act on."""
    limit = _limit_text(policy)
    sign = 1.0 if policy.higher_is_better else -1.0
    base_value = base.value if base else None
    if value is None:
        return GateRow(
            name=name,
            value=None,
            limit=limit,
            verdict="fail",
            baseline=base_value,
            why="not measured: the candidate's report has no such metric; check the suite's metric key "
            "('metric,filter') against what lm-eval reports for the task",
        )
    row = {"name": name, "value": value.value, "limit": limit, "baseline": base_value, "stderr": value.stderr}
    if policy.floor is not None and sign * (value.value - policy.floor) < 0:
        side = "below" if policy.higher_is_better else "above"
        gap = abs(value.value - policy.floor)
        why = f"{_fmt(value.value)} is {side} the floor {_fmt(policy.floor)} by {_fmt(gap)}"
        if base is not None:
            why += f" (baseline {_fmt(base.value)}, a change of {value.value - base.value:+.4g})"
        why += ": do not promote this candidate"
        return GateRow(**row, verdict="fail", why=why + note)
    allowed = allowed_regression(policy, base.value) if base else None
    if base is None or allowed is None:
        if policy.floor is not None:
            reason = "no baseline" if base is None else "no regression rule for this metric"
            why = f"{_fmt(value.value)} meets the floor {_fmt(policy.floor)} ({reason}: judged by the floor alone)"
            return GateRow(**row, verdict="pass", why=why + note)
        if base is None:
            why = (
                "no baseline to compare with and no floor: pass --baseline (the incumbent's EvalReport or "
                "PromotionRecord) or set a floor for this metric in the suite"
            )
        else:
            why = "no rule for this metric: set max_regression_abs, max_regression_rel or floor in the suite"
        return GateRow(**row, verdict="inconclusive", why=why + note)
    drop = sign * (base.value - value.value)
    worse = "below" if policy.higher_is_better else "above"
    if drop == 0:  # said as such: "-0 above the baseline" read as a regression to people
        why = f"{_fmt(value.value)} equals the baseline {_fmt(base.value)}: no regression"
        return GateRow(**row, verdict="pass", why=why + note)
    if drop < 0:
        better = "above" if policy.higher_is_better else "below"
        why = f"{_fmt(value.value)} is {_fmt(-drop)} {better} the baseline {_fmt(base.value)}: no regression"
        return GateRow(**row, verdict="pass", why=why + note)
    if drop <= allowed:
        why = f"{_fmt(value.value)} is {_fmt(drop)} {worse} the baseline {_fmt(base.value)}, "
        why += f"within the allowed {_fmt(allowed)}"
        return GateRow(**row, verdict="pass", why=why + note)
    spread = combined_stderr(value, base)
    if policy.stderr_k is not None and spread is not None and drop <= policy.stderr_k * spread:
        noise = policy.stderr_k * spread
        why = (
            f"{_fmt(value.value)} is {_fmt(drop)} {worse} the baseline {_fmt(base.value)}, more than the allowed "
            f"{_fmt(allowed)} but within {_fmt(policy.stderr_k)}×σ = {_fmt(noise)} (combined stderr {_fmt(spread)}): "
            "not a measurable regression; evaluate more samples (a higher limit) to tell"
        )
        return GateRow(**row, verdict="pass", why=why + note)
    beyond = ""
    if policy.stderr_k is not None:
        noise = policy.stderr_k * (spread or 0.0)
        beyond = f" and beyond {_fmt(policy.stderr_k)}×σ = {_fmt(noise)}"
        if spread is None:
            beyond += " (no stderr reported: the drop is taken as is)"
    why = (
        f"{_fmt(value.value)} is {_fmt(drop)} {worse} the baseline {_fmt(base.value)}: more than the allowed "
        f"{_fmt(allowed)}{beyond}; the candidate is measurably worse, do not promote it "
        "(or relax this metric's policy in the suite if the drop is acceptable)"
    )
    return GateRow(**row, verdict="fail", why=why + note)


def eval_gate(
    candidate: EvalReport, baseline: EvalReport | None, suite: Suite, defaults: EvalPolicy | None = None
) -> GateResult:
    """Judge every metric the suite names. Pure: no I/O, the same inputs always give the same result.

    ``defaults`` (the environment's ``gates.eval.policy``) fills policy fields the suite leaves unset.
    """
    note = ""
    if baseline is not None and baseline.suite_sha256 != candidate.suite_sha256:
        note = " (note: the baseline was measured with a different version of the suite)"
    rows = []
    for task, metric in suite.metric_keys():
        policy = effective_policy(suite.tasks[task].metrics[metric], defaults)
        base = baseline.metric(task, metric) if baseline is not None else None
        rows.append(judge_metric(f"{task} {metric}", policy, candidate.metric(task, metric), base, note))
    return GateResult(gate=GATE_NAME, rows=rows)
