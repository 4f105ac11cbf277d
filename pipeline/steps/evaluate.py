"""evaluate: the candidate on an eval suite -> EvalReport. The gate is judged by the promotion.

With ``engine="vllm"`` the suite runs against the artifact as vLLM serves it (the chart's args for ``values``):
the score of the bytes and kernels production runs. Otherwise (no engine asked for, or the `transformers`
fallback where vLLM cannot serve the artifact here) the weights are evaluated in this process.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pipeline.config import EvalPolicy
from pipeline.evaluate import EvalReport, LocalWeights, evaluate, load_suite
from pipeline.progress import Progress
from pipeline.serve import Engine, LocalServer
from pipeline.steps.base import StepRequest


class EvaluateRequest(StepRequest):
    step: Literal["evaluate"] = "evaluate"
    model_dir: str
    suite: str
    policy: EvalPolicy = EvalPolicy()
    use_cache: bool = True
    store: bool = True
    engine: Engine | None = None  # vllm: through the served artifact; None / transformers: in this process
    values: dict[str, Any] | None = None  # the environment's chart values for vLLM (None: the local environment's)


def run(request: EvaluateRequest, progress: Progress | None = None) -> tuple[EvalReport, bool]:
    """Raises: TerminalError (bad weights, unknown suite or task, vLLM cannot serve it), TransientError."""
    if request.engine == "vllm":
        report = served(request)
        return report, report.skipped
    report = evaluate(
        LocalWeights(Path(request.model_dir)),
        load_suite(request.suite),
        use_cache=request.use_cache,
        store=request.store,
        progress=progress,
    )
    return report, report.skipped


def served(request: EvaluateRequest, server: LocalServer | None = None) -> EvalReport:
    """The suite against vLLM serving ``request.model_dir``: ``server`` when one runs already (the verify step's),
    else one started for it.

    Raises: TerminalError (unknown suite or task, vLLM cannot serve it), TransientError (it failed mid-run).
    """
    from pipeline.evaluate.endpoint import evaluate_served

    suite = load_suite(request.suite)
    return evaluate_served(
        Path(request.model_dir), suite, values=request.values, server=server, use_cache=request.use_cache
    )
