"""resolve: a model reference -> a ModelSource pinned to a 40-hex sha, checked against the source policy."""

from __future__ import annotations

from typing import Literal

from pipeline.config import ModelSettings
from pipeline.source import ModelSource, SourcePolicy, resolve
from pipeline.steps.base import StepRequest


def source_policy(model: ModelSettings) -> SourcePolicy:
    """The source policy promotion.yaml sets (the one place it is built from configuration)."""
    return SourcePolicy(
        allow_pickle=model.allow_pickle, trust_remote_code=model.trust_remote_code, token_env=model.hub_token_env
    )


class ResolveRequest(StepRequest):
    step: Literal["resolve"] = "resolve"
    ref: str
    policy: SourcePolicy = SourcePolicy()


def run(request: ResolveRequest) -> tuple[ModelSource, bool]:
    """Raises: TerminalError (bad reference, refused by the policy), TransientError (the Hub)."""
    return resolve(request.ref, request.policy), False
