"""load-test: serve the candidate here, apply the profile, measure -> LoadReport; the server is always stopped.

The engine is the request's, else :func:`pipeline.serve.choose_engine`'s (vLLM; `transformers serve` only where
this machine's vLLM build cannot serve the artifact). With vLLM the report adds the server's own view from
``/metrics``; either way it names the engine and release that served (``served_by``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pipeline.config import LoadGate
from pipeline.loadtest import LoadReport, synthetic_prompts
from pipeline.loadtest.served import measure
from pipeline.serve import Engine, choose_engine, local_server
from pipeline.steps.base import StepRequest


class LoadTestRequest(StepRequest):
    step: Literal["loadtest"] = "loadtest"
    model_dir: str
    gate: LoadGate
    served_name: str | None = None
    engine: Engine | None = None  # None: choose_engine's
    values: dict[str, Any] | None = None  # the environment's chart values for vLLM (None: the local environment's)


def run(request: LoadTestRequest) -> tuple[LoadReport, bool]:
    """Raises: TerminalError (the model does not serve), TransientError (it died during the load)."""
    prompts = synthetic_prompts(request.gate.profile.prompt_tokens, Path(request.model_dir))
    engine = request.engine or choose_engine(request.model_dir)[0]
    with local_server(request.model_dir, engine=engine, values=request.values) as server:
        report = measure(server, request.gate.profile, prompts)
    return report, False
