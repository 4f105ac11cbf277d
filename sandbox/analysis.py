"""The AnalysisRun controller of the sandbox: measurements against a real Prometheus, rolled up as Argo does.

:class:`AnalysisRuns` reconciles one AnalysisRun (argoproj.io/v1alpha1) as argo-rollouts' ``analysis/analysis.go``:
a metric is measured when due (``initialDelay`` after the run started, then every ``interval``, until ``count``),
its query with ``{{args.name}}`` substituted goes over HTTP to Prometheus' ``/api/v1/query`` (whatever address the
template names: the sandbox has one Prometheus, ``prometheus_url``), a vector becomes ``result`` as a list of
floats (a scalar as a float), and ``successCondition`` / ``failureCondition`` decide the measurement:
Successful, Failed, Inconclusive (neither holds) or Error (no answer, a condition that cannot be evaluated). A
metric is Failed once failed > failureLimit, Inconclusive once inconclusive > inconclusiveLimit, Error once
consecutiveError > consecutiveErrorLimit (default 4); the run takes the worst of its completed metrics, and one
completed metric terminates the others. ``spec.terminate`` ends a run; a metric still running then counts as
Successful ("Run Terminated"). Measurement times come from the injected clock, so tests never sleep.
"""

from __future__ import annotations

import copy
import json
import math
import re
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from .expressions import ConditionError, evaluate
from .store import BY_KIND, ApiError, Obj, Store

ANALYSISRUN = BY_KIND["AnalysisRun"]
Clock = Callable[[], datetime]
COMPLETED = ("Successful", "Failed", "Error", "Inconclusive")
WORST_LAST = ("Successful", "Running", "Pending", "Inconclusive", "Error", "Failed")  # analysisStatusOrder
DEFAULT_CONSECUTIVE_ERROR_LIMIT = 4
DEFAULT_ERROR_RETRY_S = 10.0
HISTORY_LIMIT = 10  # measurements kept per metric
RESOLVED_QUERY = "ResolvedPrometheusQuery"


class MeasurementError(Exception):
    """The provider could not measure (an Error measurement, with this message)."""


def rfc3339(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(text: str) -> datetime:
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)


def duration_s(value: Any) -> float:
    """Argo durations: "30s", "1m", "2h", "1m30s", "500ms", or a number of seconds."""
    if isinstance(value, int | float):
        return float(value)
    text = str(value).strip()
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h)", text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise ValueError(f"not a duration: {value!r} (use e.g. 30s, 1m, 2h)")
    return sum(float(n) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[u] for n, u in parts)


def go_float(value: float) -> str:
    """A float as Prometheus' SampleValue.String() writes it (shortest, no exponent; NaN, +Inf, -Inf)."""
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    text = repr(value)
    if "e" in text or "E" in text:
        text = format(Decimal(text), "f")
    return text[:-2] if text.endswith(".0") else text


def resolve_args(text: str, args: dict[str, str]) -> str:
    """``{{args.name}}`` -> its value (``{{ args.name }}`` too); an unknown one is an error, as Argo's template."""

    def sub(m: re.Match[str]) -> str:
        tag = m.group(1).strip()
        if tag.startswith("args.") and tag[5:] in args:
            return args[tag[5:]]
        raise MeasurementError(f"failed to resolve {{{{{m.group(1)}}}}}")

    return re.sub(r"\{\{(.*?)\}\}", sub, text)


def effective_count(metric: Obj) -> int | None:
    """``count``; without it a metric with no interval is measured once, one with an interval indefinitely."""
    count = int(metric.get("count") or 0)
    if count == 0:
        return None if metric.get("interval") else 1
    return count


def _limit(metric: Obj, name: str, default: int = 0) -> int:
    value = metric.get(name)
    return default if value is None else int(value)


def assess_failure(metric: Obj, result: Obj) -> tuple[str, str]:
    """``assessMetricFailureInconclusiveOrError``: the phase a metric has reached by its limits, and why."""
    phase, message = "", ""
    failure_limit = _limit(metric, "failureLimit")
    if failure_limit >= 0 and result.get("failed", 0) > failure_limit:
        phase, message = "Failed", f"failed ({result['failed']}) > failureLimit ({failure_limit})"
    inconclusive_limit = _limit(metric, "inconclusiveLimit")
    if result.get("inconclusive", 0) > inconclusive_limit:
        count = result["inconclusive"]
        phase, message = "Inconclusive", f"inconclusive ({count}) > inconclusiveLimit ({inconclusive_limit})"
    error_limit = _limit(metric, "consecutiveErrorLimit", DEFAULT_CONSECUTIVE_ERROR_LIMIT)
    if result.get("consecutiveError", 0) > error_limit:
        count = result["consecutiveError"]
        phase, message = "Error", f"consecutiveErrors ({count}) > consecutiveErrorLimit ({error_limit})"
    return phase, message


def assess_metric(metric: Obj, result: Obj, terminating: bool) -> str:
    """``assessMetricStatus``: Pending, Running, or a completed phase."""
    if result.get("phase") in COMPLETED:
        return str(result["phase"])
    measurements = result.get("measurements") or []
    if not measurements:
        return "Successful" if terminating else "Pending"
    if measurements[-1].get("phase") not in COMPLETED:
        return "Running"
    phase, _ = assess_failure(metric, result)
    if phase:
        return phase
    count = effective_count(metric)
    if (count is not None and result.get("count", 0) >= count) or terminating:
        return "Successful"
    return "Running"


def evaluate_result(metric: Obj, result: Any) -> str:
    """``EvaluateResult``: the measurement's phase from the success and failure conditions."""
    success_text, failure_text = metric.get("successCondition") or "", metric.get("failureCondition") or ""
    success = evaluate(success_text, result) if success_text else False
    failure = evaluate(failure_text, result) if failure_text else False
    if not success_text and not failure_text:
        return "Successful"
    if success_text and not failure_text:
        failure = not success
    elif failure_text and not success_text:
        success = not failure
    if failure:
        return "Failed"
    return "Successful" if success else "Inconclusive"


class Prometheus:
    """Instant queries over HTTP, as the Prometheus provider's client makes them."""

    def __init__(self, url: str, timeout_s: float = 10.0) -> None:
        self.url = url.rstrip("/")
        self.timeout_s = timeout_s

    def query(self, promql: str) -> tuple[str, Any]:
        """(the value as Argo records it, the ``result`` the conditions see); MeasurementError when none."""
        address = f"{self.url}/api/v1/query?{urllib.parse.urlencode({'query': promql})}"
        try:
            with urllib.request.urlopen(address, timeout=self.timeout_s) as answer:
                body = json.loads(answer.read())
        except urllib.error.HTTPError as exc:
            try:
                body = json.loads(exc.read())
            except ValueError:
                raise MeasurementError(f"Prometheus answered HTTP {exc.code}") from None
        except (OSError, ValueError) as exc:
            raise MeasurementError(f"Prometheus at {self.url} did not answer: {exc}") from None
        if body.get("status") != "success":
            raise MeasurementError(f"{body.get('errorType', 'error')}: {body.get('error', 'query failed')}")
        data = body.get("data") or {}
        if data.get("resultType") == "scalar":
            value = float(data["result"][1])
            return go_float(value), value
        if data.get("resultType") == "vector":
            values = [float(sample["value"][1]) for sample in data.get("result") or []]
            return "[" + ",".join(go_float(v) for v in values) + "]", values
        raise MeasurementError("Prometheus metric type not supported")


class AnalysisRuns:
    """Reconciles AnalysisRuns in ``store``; every Prometheus address is served by ``prometheus_url``."""

    def __init__(self, store: Store, prometheus_url: str, clock: Clock, timeout_s: float = 10.0) -> None:
        self.store = store
        self.prometheus = Prometheus(prometheus_url, timeout_s)
        self.clock = clock

    def reconcile(self, namespace: str, name: str) -> Obj:
        """Measure what is due (outside the store lock: the queries take time), then write the run's status."""
        run = self.store.get(ANALYSISRUN, namespace, name)
        if (run.get("status") or {}).get("phase") in COMPLETED:
            return run
        status = self.step(run)

        def put(obj: Obj) -> None:
            obj["status"] = status

        return self.store.update(ANALYSISRUN, namespace, name, put)

    def terminate(self, namespace: str, name: str) -> None:
        """``{"spec":{"terminate":true}}`` as the Rollouts controller sends it, then one reconcile."""
        try:
            run = self.store.get(ANALYSISRUN, namespace, name)
        except ApiError:
            return
        if (run.get("status") or {}).get("phase") in COMPLETED or run["spec"].get("terminate"):
            return
        self.store.update(ANALYSISRUN, namespace, name, lambda obj: obj["spec"].update(terminate=True))
        self.reconcile(namespace, name)

    # the controller ------------------------------------------------------------------------------------------
    def step(self, run: Obj) -> Obj:
        """The run's new status (``reconcileAnalysisRun``)."""
        run = copy.deepcopy(run)
        status: Obj = run.setdefault("status", {})
        metrics: list[Obj] = run["spec"].get("metrics") or []
        if "metricResults" not in status:
            status["metricResults"] = []
            problem = self._invalid(metrics)
            if problem:
                return {**status, "phase": "Error", "message": f"analysis spec invalid: {problem}"}
        now = self.clock()
        args = {a["name"]: str(a["value"]) for a in run["spec"].get("args") or [] if a.get("value") is not None}
        terminating = self._terminating(run)
        for metric in metrics:
            if not self._due(status, metric, now, terminating):
                continue
            try:
                resolved = json.loads(resolve_args(json.dumps(metric), args))
            except MeasurementError as exc:
                return {**status, "phase": "Error", "message": f"unable to resolve metric arguments: {exc}"}
            self._record(status, metric["name"], self._measure(resolved, now), resolved)
        status.setdefault("startedAt", rfc3339(now))
        phase, message = self._assess(run, metrics, terminating)
        if phase not in COMPLETED and self._terminating(run):  # a metric just completed: the others stop now
            phase, message = self._assess(run, metrics, True)
        if phase != status.get("phase"):
            status["phase"] = phase
            if message:
                status["message"] = message
            else:
                status.pop("message", None)
            if phase in COMPLETED:
                status["completedAt"] = rfc3339(now)
        return status

    @staticmethod
    def _invalid(metrics: list[Obj]) -> str:
        if not metrics:
            return "no metrics specified"
        names = [m.get("name") for m in metrics]
        for i, name in enumerate(names):
            if names.index(name) != i:
                return f"metrics[{i}]: duplicate name '{name}'"
            if "prometheus" not in (metrics[i].get("provider") or {}):
                return f"metrics[{i}]: the sandbox measures only the prometheus provider"
        return ""

    @staticmethod
    def _result(status: Obj, name: str) -> Obj | None:
        return next((r for r in status.get("metricResults") or [] if r["name"] == name), None)

    def _terminating(self, run: Obj) -> bool:
        if run["spec"].get("terminate"):
            return True
        return any(r.get("phase") in ("Failed", "Error", "Inconclusive") for r in run["status"]["metricResults"])

    def _due(self, status: Obj, metric: Obj, now: datetime, terminating: bool) -> bool:
        """``generateMetricTasks``: whether this metric is measured now."""
        result = self._result(status, metric["name"]) or {}
        if result.get("phase") in COMPLETED or terminating:
            return False
        measurements = result.get("measurements") or []
        if not measurements:
            if metric.get("initialDelay"):
                started = status.get("startedAt")
                return started is not None and now >= parse_time(started) + timedelta(
                    seconds=duration_s(metric["initialDelay"])
                )
            return True
        count = effective_count(metric)
        if count is not None and result.get("count", 0) >= count:
            return False
        interval = duration_s(metric["interval"]) if metric.get("interval") else DEFAULT_ERROR_RETRY_S
        return now >= parse_time(measurements[-1]["finishedAt"]) + timedelta(seconds=interval)

    def _measure(self, metric: Obj, now: datetime) -> Obj:
        measurement: Obj = {"startedAt": rfc3339(now)}
        try:
            value, result = self.prometheus.query(metric["provider"]["prometheus"].get("query") or "")
            measurement["value"] = value
            measurement["phase"] = evaluate_result(metric, result)
        except (MeasurementError, ConditionError) as exc:
            measurement["phase"] = "Error"
            measurement["message"] = str(exc)
        measurement["finishedAt"] = rfc3339(self.clock())
        return measurement

    def _record(self, status: Obj, name: str, measurement: Obj, metric: Obj) -> None:
        """Count the measurement into its metric's result, as ``runMeasurements`` does."""
        result = self._result(status, name)
        if result is None:
            result = {"name": name, "phase": "Running"}
            status["metricResults"].append(result)
        phase = measurement["phase"]
        key = {"Successful": "successful", "Failed": "failed", "Inconclusive": "inconclusive", "Error": "error"}
        result[key[phase]] = result.get(key[phase], 0) + 1
        if phase == "Error":
            result["consecutiveError"] = result.get("consecutiveError", 0) + 1
        else:
            result["count"] = result.get("count", 0) + 1
            result["consecutiveError"] = 0
        result["measurements"] = [*(result.get("measurements") or []), measurement][-HISTORY_LIMIT:]
        result["metadata"] = {RESOLVED_QUERY: metric["provider"]["prometheus"].get("query") or ""}

    def _assess(self, run: Obj, metrics: list[Obj], terminating: bool) -> tuple[str, str]:
        """``assessRunStatus``: the run's phase (the worst completed metric once all are) and its message."""
        status = run["status"]
        worst, message, everything_completed = "", "Run Terminated" if run["spec"].get("terminate") else "", True
        summary = {"count": 0, "successful": 0, "failed": 0, "inconclusive": 0, "error": 0}
        for metric in metrics:
            summary["count"] += 1
            result = self._result(status, metric["name"])
            if result is None:
                everything_completed = False
                continue
            phase = assess_metric(metric, result, terminating)
            if phase != result.get("phase"):
                last = (result.get("measurements") or [{}])[-1]
                if last.get("message"):
                    result["message"] = last["message"]
                result["phase"] = phase
            if phase not in COMPLETED:
                everything_completed = False
                continue
            reached, why = assess_failure(metric, result)
            if not worst or WORST_LAST.index(phase) > WORST_LAST.index(worst):
                worst = phase
                if why:
                    message = f'Metric "{metric["name"]}" assessed {phase} due to {why}'
                    if result.get("message"):
                        message += f': "Error Message: {result["message"]}"'
            summary[(reached or "Successful").lower()] += 1
        status["runSummary"] = summary
        if terminating:
            return worst or "Successful", message.strip()
        if not everything_completed or not worst:
            return "Running", ""
        return worst, message.strip()
