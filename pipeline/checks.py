"""The checks run against the canary at each pause step, each a GateResult that rollout.decide consumes.

- ``load``: a short load test through the canary Service with the load-test gate's own engine, judged by the
  environment's SLO.
- ``metrics``: the canary's vLLM metrics from Prometheus, compared with the stable pods' (TTFT p95 no worse
  than ``max_ttft_ratio_vs_stable`` times stable's, and within the SLO) and the canary's 5xx ratio.
  Pods are told apart by the ``rollouts_pod_template_hash`` label Argo Rollouts puts on them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import httpx

from pipeline.config import Environment
from pipeline.errors import TerminalError
from pipeline.gates import GateResult, GateRow
from pipeline.rollout import ObservedRollout
from pipeline.secrets import redact

Check = Callable[[ObservedRollout], GateResult]


def _query(url: str, promql: str) -> float | None:
    """One instant query; None when there is no sample (no traffic yet) or Prometheus did not answer."""
    try:
        response = httpx.get(f"{url.rstrip('/')}/api/v1/query", params={"query": promql}, timeout=10)
        response.raise_for_status()
        result = response.json()["data"]["result"]
    except (httpx.HTTPError, ValueError, KeyError, TypeError):
        return None
    if not result:
        return None
    value = float(result[0]["value"][1])
    return None if value != value else value  # NaN: no data in the window


def _pod_labels(namespace: str, pod_hash: str) -> str:
    return f'namespace="{namespace}",rollouts_pod_template_hash="{pod_hash}"'


def ttft_p95_query(namespace: str, pod_hash: str, window: str) -> str:
    labels = _pod_labels(namespace, pod_hash)
    return (
        f"histogram_quantile(0.95, sum by (le) (rate(vllm:time_to_first_token_seconds_bucket{{{labels}}}[{window}])))"
    )


def error_ratio_query(namespace: str, pod_hash: str, window: str) -> str:
    """5xx answers / all answers of the OpenAI API (``/v1/...``) on the pods of ``pod_hash``.

    vLLM's ``http_requests_total{status="5xx"}`` series exists only after the first 5xx answer, so a healthy pod has
    none: the numerator reads a missing series as 0 (``or vector(0)``). The denominator has no such fallback, so a pod
    that answered nothing in the window stays "no data" (or NaN for 0/0): inconclusive, never a pass.
    """
    labels = f'{_pod_labels(namespace, pod_hash)},handler=~"/v1/.*"'
    return (
        f'(sum(rate(http_requests_total{{status="5xx",{labels}}}[{window}])) or vector(0)) '
        f"/ sum(rate(http_requests_total{{{labels}}}[{window}]))"
    )


def _vs_stable_row(canary_ms: float | None, stable_ttft: float | None, stable: str, env: Environment) -> GateRow:
    """Canary TTFT p95 against stable's: inconclusive (never left out) when either side has no data."""
    ratio, name = env.canary.max_ttft_ratio_vs_stable, "canary ttft_p95 vs stable"
    if canary_ms is None or stable_ttft is None:
        why = (
            "no TTFT samples from the canary pods: nothing to compare"
            if canary_ms is None
            else f"no TTFT samples from the stable pods ({stable}) in the window: nothing to compare with"
        )
        return GateRow(name=name, value=canary_ms, limit=f"<= x{ratio:g} stable", verdict="inconclusive", why=why)
    limit = stable_ttft * 1000 * ratio
    ok = canary_ms <= limit
    return GateRow(
        name=name,
        value=canary_ms,
        baseline=stable_ttft * 1000,
        limit=f"<= {limit:.0f} ms",
        verdict="pass" if ok else "fail",
        why=f"{canary_ms:.0f} ms vs stable {stable_ttft * 1000:.0f} ms (x{ratio:g} = {limit:.0f})",
    )


def metrics_rows(
    canary_ttft: float | None,
    stable_ttft: float | None,
    error_ratio: float | None,
    env: Environment,
    stable: str = "stable",
) -> list[GateRow]:
    """Judge the canary's metrics (seconds, ratio) against stable's and the SLO. Pure.

    ``None`` means "no data" (no samples in the window); each such value gives an inconclusive row, so a canary
    nobody sent requests to is never passed. ``stable`` names the stable pods in the explanation.
    """
    rows: list[GateRow] = []
    slo = env.gates.load.slo if env.gates.load else None
    ms = None if canary_ttft is None else canary_ttft * 1000
    if ms is None:
        rows.append(
            GateRow(
                name="canary ttft_p95",
                value=None,
                limit="has data",
                verdict="inconclusive",
                why="no TTFT samples from the canary pods yet (no traffic in the window?)",
            )
        )
    rows.append(_vs_stable_row(ms, stable_ttft, stable, env))
    if ms is not None and slo and "ttft_p95" in slo.latency_ms:
        bound = slo.latency_ms["ttft_p95"]
        rows.append(
            GateRow(
                name="canary ttft_p95",
                value=ms,
                limit=f"<= {bound:g} ms",
                verdict="pass" if ms <= bound else "fail",
                why=f"{ms:.0f} ms {'<=' if ms <= bound else '>'} {bound:g} ms",
            )
        )
    max_errors = slo.max_error_rate if slo else 0.01
    if error_ratio is None:
        rows.append(
            GateRow(
                name="canary 5xx ratio",
                value=None,
                limit=f"<= {max_errors:.2%}",
                verdict="inconclusive",
                why="no requests counted on the canary pods yet",
            )
        )
    else:
        ok = error_ratio <= max_errors
        rows.append(
            GateRow(
                name="canary 5xx ratio",
                value=error_ratio,
                limit=f"<= {max_errors:.2%}",
                verdict="pass" if ok else "fail",
                why=f"{error_ratio:.2%} {'<=' if ok else '>'} {max_errors:.2%}",
            )
        )
    return rows


def metrics_check(env_name: str, env: Environment) -> Check:
    """The Prometheus check for ``env``'s canary.

    Raises:
        TerminalError: the environment names no Prometheus or no Rollout.
    """
    if env.canary.prometheus_url is None or env.rollout is None:
        raise TerminalError(
            f"environment {env_name} asks for the metrics check but has no canary.prometheus_url or rollout",
            hint="set canary.prometheus_url, or drop 'metrics' from canary.checks",
        )
    url, namespace, window = env.canary.prometheus_url, env.rollout.namespace, env.canary.metrics_window

    def check(seen: ObservedRollout) -> GateResult:
        canary, stable = seen.current_pod_hash or "", seen.stable_rs or ""
        # With no stable ReplicaSet distinct from the canary there is nothing to compare with: that reads as
        # "no data" (inconclusive), not as a comparison left out.
        rows = metrics_rows(
            _query(url, ttft_p95_query(namespace, canary, window)),
            _query(url, ttft_p95_query(namespace, stable, window)) if stable and stable != canary else None,
            _query(url, error_ratio_query(namespace, canary, window)),
            env,
            stable=f"hash {stable}" if stable and stable != canary else "no stable ReplicaSet besides the canary",
        )
        return GateResult(gate="canary metrics", rows=rows)

    return check


def load_check(env_name: str, env: Environment, model: str, tokenizer_dir: Path | None = None) -> Check:
    """A short load test through the canary Service, judged by the environment's SLO.

    Raises:
        TerminalError: the environment has no canary endpoint or no load gate.
    """
    from pipeline.loadtest import Target, gate, run_load, synthetic_prompts

    load = env.gates.load
    if env.endpoint is None or load is None:
        raise TerminalError(
            f"environment {env_name} asks for the load check but has no endpoint or gates.load",
            hint="set endpoint (the canary Service) and gates.load, or drop 'load' from canary.checks",
        )
    target = Target(endpoint=env.endpoint, model=model)
    prompts = synthetic_prompts(load.profile.prompt_tokens, tokenizer_dir)

    def check(seen: ObservedRollout) -> GateResult:
        try:
            report = run_load(target, load.profile, prompts)
        except TerminalError as exc:
            return GateResult(
                gate="canary load",
                rows=[GateRow(name="load test", value=None, limit="runs", verdict="fail", why=redact(exc.what))],
            )
        return gate(report, load.slo).model_copy(update={"gate": "canary load"})

    return check


def combined(checks: Sequence[Check]) -> Check:
    """All checks as one: every row of every check, so one failure fails the step."""

    def check(seen: ObservedRollout) -> GateResult:
        results = [c(seen) for c in checks]
        return GateResult(gate=" + ".join(r.gate for r in results), rows=[row for r in results for row in r.rows])

    return check


def canary_checks(env_name: str, env: Environment, model: str, tokenizer_dir: Path | None = None) -> Check:
    """The checks ``canary.checks`` asks for, as one Check."""
    chosen: list[Check] = []
    for kind in env.canary.checks:
        chosen.append(
            load_check(env_name, env, model, tokenizer_dir) if kind == "load" else metrics_check(env_name, env)
        )
    return combined(chosen)
