"""The two gates as Prefect tasks: the lm-eval quality gate and the load-test latency gate.

Both only produce evidence (a report and a GateResult); the flow decides. The evaluation is cached on its
identity (what was evaluated, the suite's content, lm-eval's version) across flow runs, by the library's own
result cache and by this task's cache key.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.context import TaskRunContext

from flows.steps import RETRIES
from pipeline.config import Environment, EvalGate, LoadGate
from pipeline.gates import GateResult
from pipeline.record import PromotionRecord


def eval_key(context: TaskRunContext, parameters: dict[str, Any]) -> str:
    """The evaluation's identity: subject (artifact id or weights hash), suite content, lm-eval version."""
    from pipeline.evaluate import LocalWeights, load_suite
    from pipeline.evaluate.run import cache_key, subject_of

    suite = load_suite(parameters["gate"].suite)
    baseline = parameters.get("baseline")
    base = baseline.id if baseline is not None else "floors"
    return f"eval-{cache_key(subject_of(LocalWeights(Path(parameters['model_dir']))), suite, 'hf')}-vs-{base}"


@task(name="evaluate", cache_key_fn=eval_key, timeout_seconds=6 * 3600, **RETRIES)
def eval_step(model_dir: Path, gate: EvalGate, baseline: PromotionRecord | None) -> tuple[dict[str, Any], GateResult]:
    """Evaluate the candidate on the suite and judge it against the incumbent's recorded report (or floors)."""
    from pipeline.evaluate import LocalWeights, eval_gate, evaluate, load_suite
    from pipeline.evaluate.report import baseline_from_record

    suite = load_suite(gate.suite)
    report = evaluate(LocalWeights(model_dir), suite)
    base = baseline_from_record(baseline)
    return report.model_dump(mode="json"), eval_gate(report, base, suite, gate.policy)


@task(name="loadtest", cache_policy=NO_CACHE, timeout_seconds=3600, **RETRIES)
def load_step(model_dir: Path, gate: LoadGate, served_name: str | None) -> tuple[dict[str, Any], GateResult]:
    """Serve the candidate on this machine (transformers serve), load-test it, judge it by the SLO; always stop it."""
    from pipeline.loadtest import Target, run_load, synthetic_prompts
    from pipeline.loadtest import gate as load_gate
    from pipeline.serve import local_server

    prompts = synthetic_prompts(gate.profile.prompt_tokens, model_dir)
    with local_server(model_dir) as server:
        report = run_load(Target(endpoint=server.url, model=server.model), gate.profile, prompts)
    return report.model_dump(mode="json"), load_gate(report, gate.slo)


@task(name="evaluate-job", cache_policy=NO_CACHE, timeout_seconds=6 * 3600, **RETRIES)
def eval_job(
    model_dir: str, gate: EvalGate, baseline: PromotionRecord | None, env_name: str, env: Environment
) -> tuple[dict[str, Any], GateResult]:
    """The evaluation as a Job next to the preloaded weights; the gate is judged here, against Git's baseline."""
    from flows.steps import on_cluster
    from pipeline.evaluate import EvalReport, eval_gate, load_suite
    from pipeline.evaluate.report import baseline_from_record

    suite = load_suite(gate.suite)
    result = on_cluster("evaluate", [model_dir, "--suite", gate.suite, "--report-only"], env_name, env)
    report = EvalReport.model_validate(result["report"])
    return report.model_dump(mode="json"), eval_gate(report, baseline_from_record(baseline), suite, gate.policy)
