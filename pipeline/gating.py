"""Measure the candidate and judge it, before anything reaches Git: it loads and answers in the serving engine
(verify), then the gates by their kind (eval against Git's baseline; here also the load SLO and the capacity
sweep), and the replicas its capacity plan asks for. Each gate's report is kept in the artifact store by the bytes'
manifest digest. Called by :func:`pipeline.promotion.promote`, which owns the sequence and the decision.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.cache import MARKER as CACHE_MARKER
from pipeline.errors import Decided
from pipeline.evaluate.gate import eval_gate
from pipeline.evaluate.report import baseline_from_record
from pipeline.evaluate.suite import load_suite
from pipeline.gates import GateResult
from pipeline.loadtest import gate as load_gate
from pipeline.loadtest.capacity import capacity_gate
from pipeline.loadtest.capacity_plan import capacity_plan, replica_changes
from pipeline.steps import CapacityRequest, EvaluateRequest, LoadTestRequest, VerifyRequest, VerifyResult

if TYPE_CHECKING:
    from pipeline.promotion import Run
    from pipeline.record import PromotionRecord


def serving_values(run: Run) -> dict[str, Any] | None:
    """The chart values vLLM is started with for the environment: on a cluster, its values file on the GitOps
    branch (the sidecar of the verify/evaluate Jobs); locally None (the local environment's values)."""
    if run.env.executor != "kubernetes":
        return None
    from pipeline.gitops.guarded import values_at

    return values_at(run.gitops, f"refs/remotes/origin/{run.gitops.branch}", run.env.values_file)


def verify(run: Run, model_dir: str, artifact_id: str) -> VerifyResult:
    """Prove the artifact loads and answers in the engine that serves the gates (vLLM; where this machine's vLLM
    cannot serve its format, transformers, and the record says why). A refusal rejects it: nothing is committed.

    Where vLLM serves it, the eval suite runs against the same server once it passed (one start, not two; on a
    cluster one Job pod): :func:`judge` takes that report.

    Raises:
        PromotionRejected: the engine refused the artifact (its own reason).
        TerminalError: the step failed.
    """
    values, gate = serving_values(run), run.env.gates.eval
    evaluate = None
    if gate is not None:
        evaluate = EvaluateRequest(
            model_dir=model_dir, suite=gate.suite, policy=gate.policy, engine="vllm", values=values
        )
    result: VerifyResult = run.step(VerifyRequest(artifact_dir=model_dir, values=values, evaluate=evaluate))
    served_by = result.served_by.removesuffix(" (in-process)")
    update = {"verify": result, "served_by": served_by, "serving_fallback": result.fallback}
    run.record = run.record.model_copy(update=update)
    if not result.passed:
        reason = f"{result.served_by} cannot load the artifact: {result.reason}"
        update = {"decision": "rejected", "reason": reason, "timings": run.timings}
        run.record = run.record.model_copy(update=update)
        run.hooks.report(run.record, run.env)
        raise PromotionRejected(
            run.record, artifact_id, "rebuild the artifact (another recipe or backend), or fix the chart's vLLM args"
        )
    return result


def keep_report(run: Run, kind: str, report: Any) -> None:
    """Keep a gate's report in the artifact store by the bytes' manifest digest (what the guard and
    `modelctl gitops verify` read); nothing without a store."""
    digest = run.record.artifact.manifest_digest if run.record.artifact else None
    if run.cfg.artifacts is None or digest is None:
        return
    from pipeline.store import store_from_settings

    store_from_settings(run.cfg.artifacts).put_report(digest, kind, report)


def judge(run: Run, model_dir: str) -> list[GateResult]:
    """Measure the candidate and judge it: the eval gate against Git's baseline, then (here) the latency SLO."""
    env, gates = run.env, []
    if env.gates.eval is not None:
        gate, verified = env.gates.eval, run.record.verify
        report = verified.eval_report if verified is not None else None
        if verified is not None and report is not None:  # run by the verify step on its server: kept once
            run.record = run.record.model_copy(update={"verify": verified.model_copy(update={"eval_report": None})})
        else:
            engine = "vllm" if verified is not None and verified.engine == "vllm" else None
            asked = EvaluateRequest(
                model_dir=model_dir, suite=gate.suite, policy=gate.policy, engine=engine, values=serving_values(run)
            )
            report = run.step(asked)
        keep_report(run, "eval", report)
        baseline = baseline_from_record(run.gitops.baseline(run.env_name))
        result = eval_gate(report, baseline, load_suite(gate.suite), gate.policy)
        run.record = run.record.model_copy(update={"eval_report": report, "eval_gate": result})
        gates.append(result)
    if env.gates.load is not None and env.executor == "local" and all(g.passed for g in gates):
        served = run.record.verify.engine if run.record.verify is not None else None
        request = LoadTestRequest(
            model_dir=model_dir,
            gate=env.gates.load,
            served_name=run.cfg.model.served_name,
            engine="vllm" if served == "vllm" else "transformers" if served else None,
            values=serving_values(run),
        )
        report = run.step(request)
        keep_report(run, "load", report)
        result = load_gate(report, env.gates.load.slo)
        run.record = run.record.model_copy(update={"load_report": report, "load_gate": result})
        gates.append(result)
    if (
        env.gates.capacity is not None
        and env.gates.load is not None
        and env.executor == "local"
        and all(g.passed for g in gates)
    ):
        gates.append(judge_capacity(run, model_dir))
    return gates


def judge_capacity(run: Run, model_dir: str) -> GateResult:
    """Sweep the candidate and the incumbent (the live artifact, when preloaded here) on one engine in one run;
    the capacity gate and the plan go into the record."""
    env, policy, load = run.env, run.env.gates.capacity, run.env.gates.load
    assert policy is not None and load is not None
    live = run.gitops.baseline(run.env_name)
    incumbent = Path(env.cache.root) / live.artifact.id if live is not None and live.artifact is not None else None
    present = incumbent is not None and (incumbent / CACHE_MARKER).is_file()
    served = run.record.verify.engine if run.record.verify is not None else None  # the load step's engine
    request = CapacityRequest(
        model_dir=model_dir,
        incumbent_dir=str(incumbent) if present else None,
        gate=load,
        policy=policy,
        engine="vllm" if served == "vllm" else "transformers" if served else None,
        values=serving_values(run),
    )
    report = run.step(request)
    result = capacity_gate(report, policy)
    plan = capacity_plan(report, policy, env.gpu_pool.gpus_per_replica)
    update = {"capacity_report": report, "capacity_gate": result, "capacity_plan": plan}
    run.record = run.record.model_copy(update=update)
    return result


def replica_scale(run: Run) -> dict[str, Any]:
    """The values keys sizing the environment for the capacity plan (``capacity.write_replicas``), else none."""
    policy, plan = run.env.gates.capacity, run.record.capacity_plan
    if policy is None or plan is None or not policy.write_replicas:
        return {}
    run.gitops.sync()
    values = run.gitops.workdir / run.env.values_file  # a missing file: the commit names it
    return replica_changes(plan, policy, values.read_text(encoding="utf-8") if values.is_file() else "")


class PromotionRejected(Decided):
    """The serving engine or a gate refused the candidate and nothing was committed; ``record`` is the finished
    record (decision ``rejected``, the gates that refused it)."""

    def __init__(self, record: PromotionRecord, artifact_id: str, hint: str | None = None) -> None:
        what = f"{artifact_id} was rejected for {record.env}, nothing was committed: {record.reason}"
        super().__init__(what, hint=hint)
        self.record, self.artifact_id = record, artifact_id

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.record, self.artifact_id, self.hint))
