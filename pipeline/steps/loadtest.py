"""load-test: serve the candidate here, apply the profile, measure -> LoadReport; the server is always stopped."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pipeline.config import LoadGate
from pipeline.loadtest import LoadReport, Target, run_load, synthetic_prompts
from pipeline.serve import local_server
from pipeline.steps.base import StepRequest


class LoadTestRequest(StepRequest):
    step: Literal["loadtest"] = "loadtest"
    model_dir: str
    gate: LoadGate
    served_name: str | None = None


def run(request: LoadTestRequest) -> tuple[LoadReport, bool]:
    """Raises: TerminalError (the model does not serve), TransientError."""
    prompts = synthetic_prompts(request.gate.profile.prompt_tokens, Path(request.model_dir))
    with local_server(request.model_dir) as server:
        report = run_load(Target(endpoint=server.url, model=server.model), request.gate.profile, prompts)
    return report, False
