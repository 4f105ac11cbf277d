"""verify: prove the artifact loads and answers in the serving engine -> VerifyResult (a refusal is ``passed=False``
with the engine's own reason; the promotion then rejects the artifact and commits nothing).

The engine is :func:`pipeline.serve.choose_engine`'s: vLLM with the chart's args for ``values``; where this
machine's vLLM build cannot serve the artifact's format, the artifact is loaded with transformers in this process
instead, and the result says so (``engine``, ``served_by``, ``fallback``). Cached by manifest digest either way.
With ``evaluate``, vLLM goes on serving the artifact for the eval suite once it passed (``eval_report``): one start
for both (on a cluster one Job pod, whose sidecar is the slowest part). A cache hit starts nothing and evaluates
nothing: the promotion then asks the evaluate step.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from pipeline.evaluate.report import EvalReport
from pipeline.serve import LocalServer, choose_engine
from pipeline.steps.base import StepRequest
from pipeline.steps.evaluate import EvaluateRequest, served
from pipeline.verify import VerifyResult, verify_artifact, verify_in_process


class VerifyRequest(StepRequest):
    step: Literal["verify"] = "verify"
    artifact_dir: str
    values: dict[str, Any] | None = None  # the environment's chart values (None: the local environment's)
    evaluate: EvaluateRequest | None = Field(
        None, description="also run this suite against the same vLLM once it passed (one server start, not two)"
    )


def run(request: VerifyRequest) -> tuple[VerifyResult, bool]:
    """Raises: TerminalError (not a model directory, no vLLM runtime; the suite's own errors), TransientError (vLLM
    did not come up, or failed mid-suite)."""
    artifact = Path(request.artifact_dir)
    engine, fallback = choose_engine(artifact)
    if engine == "vllm":
        asked, reports = request.evaluate, list[EvalReport]()

        def evaluate_too(server: LocalServer) -> None:
            assert asked is not None  # only passed when asked
            reports.append(served(asked.model_copy(update={"model_dir": str(artifact), "engine": "vllm"}), server))

        also = evaluate_too if asked is not None else None
        result = verify_artifact(artifact, values=request.values, refusal_raises=False, while_serving=also)
        if reports:
            result = result.model_copy(update={"eval_report": reports[0]})
    else:
        result = verify_in_process(artifact, fallback or "vLLM cannot serve this artifact here")
    return result, result.skipped
