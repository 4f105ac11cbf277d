"""The promotion's steps, one small module each, as typed request -> typed result.

    resolve   ResolveRequest  -> ModelSource      pin the reference, check the source policy
    quantize  QuantizeRequest -> Artifact         the full recipe, the source policy; a skip when built
    publish   PublishRequest  -> StoredArtifact   the bytes every environment preloads, by manifest digest
    preload   PreloadRequest  -> CacheEntry       onto the cache volume, verified against the published digest
    verify    VerifyRequest   -> VerifyResult     the artifact loads and answers in the serving engine (vLLM);
                                                  asked, the eval suite runs on that server too (one start)
    evaluate  EvaluateRequest -> EvalReport       the suite on the served artifact (the gate is the promotion's)
    loadtest  LoadTestRequest -> LoadReport       serve and measure, with the server's view (the SLO is the promotion's)
    capacity  CapacityRequest -> CapacityReport   candidate and incumbent swept here (the gate is the promotion's)

:func:`run` runs any request in this process; :func:`pipeline.jobs.execute` runs it here or as a Kubernetes Job
(``python -m pipeline step run --request JSON``), validating the request and the result on both sides.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, Field, TypeAdapter, ValidationError

from pipeline.cache import CacheEntry
from pipeline.errors import TerminalError, first_problem
from pipeline.evaluate import EvalReport
from pipeline.loadtest import LoadReport
from pipeline.loadtest.capacity import CapacityReport
from pipeline.progress import Progress
from pipeline.quantize import Artifact
from pipeline.source import ModelSource
from pipeline.steps import capacity, evaluate, loadtest, preload, publish, quantize, resolve, verify
from pipeline.steps.base import StepFailure, StepRequest, StepResult, failed, timed
from pipeline.steps.capacity import CapacityRequest
from pipeline.steps.evaluate import EvaluateRequest
from pipeline.steps.loadtest import LoadTestRequest
from pipeline.steps.preload import PreloadRequest
from pipeline.steps.publish import PublishRequest, manifest_digest
from pipeline.steps.quantize import QuantizeRequest
from pipeline.steps.resolve import ResolveRequest, source_policy
from pipeline.steps.verify import VerifyRequest
from pipeline.store import StoredArtifact
from pipeline.verify import VerifyResult

AnyRequest = Annotated[
    ResolveRequest
    | QuantizeRequest
    | PublishRequest
    | PreloadRequest
    | VerifyRequest
    | EvaluateRequest
    | LoadTestRequest
    | CapacityRequest,
    Field(discriminator="step"),
]
OUTPUTS: dict[str, type[BaseModel]] = {
    "resolve": ModelSource,
    "quantize": Artifact,
    "publish": StoredArtifact,
    "preload": CacheEntry,
    "verify": VerifyResult,
    "evaluate": EvalReport,
    "loadtest": LoadReport,
    "capacity": CapacityReport,
}
_REQUEST: TypeAdapter[AnyRequest] = TypeAdapter(AnyRequest)

__all__ = [
    "OUTPUTS",
    "AnyRequest",
    "CapacityRequest",
    "EvaluateRequest",
    "LoadTestRequest",
    "PreloadRequest",
    "PublishRequest",
    "QuantizeRequest",
    "ResolveRequest",
    "StepFailure",
    "StepRequest",
    "StepResult",
    "StoredArtifact",
    "VerifyRequest",
    "VerifyResult",
    "failed",
    "manifest_digest",
    "parse_request",
    "parse_result",
    "run",
    "source_policy",
]


def parse_request(text: str | bytes, where: str = "request") -> AnyRequest:
    """A step request from JSON.

    Raises:
        TerminalError: not a valid request of a known step (the first problem named).
    """
    try:
        return _REQUEST.validate_json(text)
    except ValidationError as exc:
        raise TerminalError(
            f"{where} is not a valid step request: {first_problem(exc)}",
            hint="requests are written by modelctl (pipeline.jobs); check both sides run the same version",
        ) from None


def parse_result(step: str, text: str | bytes, where: str = "result") -> StepResult[Any]:
    """A step's result from JSON, its output validated as that step's type.

    Raises:
        TerminalError: not a valid result for ``step``.
    """
    try:
        return StepResult[OUTPUTS[step]].model_validate_json(text)  # type: ignore[valid-type]
    except ValidationError as exc:
        raise TerminalError(
            f"{where} is not a valid {step} result: {first_problem(exc)}",
            hint="the Job's image and this pipeline must be the same version of modelctl",
        ) from None


def run(request: AnyRequest, progress: Progress | None = None) -> StepResult[Any]:
    """Run one step in this process.

    Raises:
        TerminalError / TransientError: the step failed.
    """
    if isinstance(request, ResolveRequest):
        return timed("resolve", lambda: resolve.run(request))
    if isinstance(request, QuantizeRequest):
        return timed("quantize", lambda: quantize.run(request, progress))
    if isinstance(request, PublishRequest):
        return timed("publish", lambda: publish.run(request))
    if isinstance(request, PreloadRequest):
        return timed("preload", lambda: preload.run(request, progress))
    if isinstance(request, VerifyRequest):
        return timed("verify", lambda: verify.run(request))
    if isinstance(request, EvaluateRequest):
        return timed("evaluate", lambda: evaluate.run(request, progress))
    if isinstance(request, CapacityRequest):
        return timed("capacity", lambda: capacity.run(request))
    return timed("loadtest", lambda: loadtest.run(request))
