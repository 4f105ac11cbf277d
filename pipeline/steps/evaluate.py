"""evaluate: the candidate's weights on an eval suite -> EvalReport. The gate is judged by the promotion."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pipeline.config import EvalPolicy
from pipeline.evaluate import EvalReport, LocalWeights, evaluate, load_suite
from pipeline.progress import Progress
from pipeline.steps.base import StepRequest


class EvaluateRequest(StepRequest):
    step: Literal["evaluate"] = "evaluate"
    model_dir: str
    suite: str
    policy: EvalPolicy = EvalPolicy()
    use_cache: bool = True
    store: bool = True


def run(request: EvaluateRequest, progress: Progress | None = None) -> tuple[EvalReport, bool]:
    """Raises: TerminalError (bad weights, unknown suite or task), TransientError."""
    report = evaluate(
        LocalWeights(Path(request.model_dir)),
        load_suite(request.suite),
        use_cache=request.use_cache,
        store=request.store,
        progress=progress,
    )
    return report, report.skipped
