"""The reevaluate flow (scheduled): re-run the eval suite and a load test against what is live, and act on it.

For each environment it reads the live promotion's record from Git, evaluates the live artifact again (no
cached result: the point is to measure now) and judges it against that record's own eval report, and on this
machine load-tests it against the environment's SLO. A regression is reported, and rolled back when the
environment's `reevaluate.rollback_on_regression` says so.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from flows.rollback import rollback
from flows.steps import RETRIES, gitops_for
from pipeline import steps
from pipeline.config import EvalGate, LoadGate, load_config
from pipeline.gates import GateResult
from pipeline.record import PromotionRecord


@task(name="re-evaluate", cache_policy=NO_CACHE, timeout_seconds=6 * 3600, **RETRIES)
def reeval_step(model_dir: Path, gate: EvalGate, live: PromotionRecord) -> GateResult:
    """Evaluate the live weights now (never from the cache) against the report they were promoted with."""
    from pipeline.evaluate import eval_gate, load_suite
    from pipeline.evaluate.report import baseline_from_record

    request = steps.EvaluateRequest(
        model_dir=str(model_dir), suite=gate.suite, policy=gate.policy, use_cache=False, store=False
    )
    report = steps.run(request).value()
    return eval_gate(report, baseline_from_record(live), load_suite(gate.suite), gate.policy)


@task(name="loadtest", cache_policy=NO_CACHE, timeout_seconds=3600, **RETRIES)
def load_step(model_dir: Path, gate: LoadGate, served_name: str | None) -> GateResult:
    """Serve the live weights here, load-test them, judge them by the SLO."""
    from pipeline.loadtest import gate as load_gate

    request = steps.LoadTestRequest(model_dir=str(model_dir), gate=gate, served_name=served_name)
    return load_gate(steps.run(request).value(), gate.slo)


@flow(name="reevaluate", log_prints=True)
def reevaluate(config: str = "promotion.yaml", env: str | None = None, workdir: str | None = None) -> dict[str, Any]:
    """Check every live environment (or ``env``) again; returns each one's verdict and what was done."""
    logger = get_run_logger()
    cfg = load_config(config)
    names = [env] if env else cfg.promotion_order()
    results: dict[str, Any] = {}
    for name in names:
        environment = cfg.environment(name)
        live = gitops_for(cfg, Path(workdir) if workdir else None).baseline(name)
        if live is None or not live.artifact:
            results[name] = {"verdict": "nothing live"}
            continue
        if environment.executor != "local":
            results[name] = {"verdict": "skipped: re-evaluating a cluster environment runs through its canary checks"}
            continue
        model_dir = Path(environment.cache.root) / live.artifact.id
        gates: list[GateResult] = []
        if environment.gates.eval is not None:
            gates.append(reeval_step(model_dir, environment.gates.eval, live))
        if environment.gates.load is not None:
            gates.append(load_step(model_dir, environment.gates.load, cfg.model.served_name))
        regressed = [g for g in gates if not g.passed]
        summary = "; ".join(g.summary() for g in regressed) or "no regression"
        create_markdown_artifact(
            "\n".join(g.markdown() for g in gates), key=f"reevaluate-{name}", description=f"{name}: {summary}"[:200]
        )
        action = "none"
        if regressed and environment.reevaluate.rollback_on_regression:
            logger.warning("%s regressed (%s): rolling back", name, summary)
            rollback(name, config=config, reason=f"re-evaluation found a regression: {summary}"[:300], workdir=workdir)
            action = "rolled back"
        elif regressed:
            logger.warning("%s regressed (%s); rollback_on_regression is off: reported only", name, summary)
            action = "reported"
        results[name] = {"verdict": "regressed" if regressed else "ok", "why": summary, "action": action}
    return results
