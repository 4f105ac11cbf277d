"""capacity: serve the candidate and the incumbent here, on one engine, and sweep both -> CapacityReport.

Both servers run for the whole step, so the repetitions interleave (pipeline.loadtest.capacity.measure) and
drift on this machine falls on both alike. The engine is the load step's choice
(:func:`pipeline.serve.choose_engine`), the same for both sides: vLLM unless either artifact needs the fallback.
The gate and the plan are the promotion's; this step only measures. Both servers are always stopped.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, ExitStack
from pathlib import Path
from typing import Any, Literal, Protocol

from pipeline.config import CapacityPolicy, LoadGate, LoadProfile
from pipeline.loadtest import LoadReport, PromptSet, Target, run_load, synthetic_prompts
from pipeline.loadtest.capacity import CapacityReport, measure
from pipeline.serve import Engine, choose_engine, local_server
from pipeline.steps.base import StepRequest


class CapacityRequest(StepRequest):
    step: Literal["capacity"] = "capacity"
    model_dir: str = ""
    incumbent_dir: str | None = None
    gate: LoadGate
    policy: CapacityPolicy
    engine: Engine | None = None  # None: choose_engine's, for both sides
    values: dict[str, Any] | None = None  # the environment's chart values for vLLM (None: the local environment's)
    timeout_s: float = 60.0


class Served(Protocol):
    """What the step needs of a running server (pipeline.serve.LocalServer)."""

    @property
    def url(self) -> str: ...

    @property
    def model(self) -> str: ...

    @property
    def served_by(self) -> str: ...

    def check_alive(self) -> None: ...


Serve = Callable[[str, Engine, dict[str, Any] | None], AbstractContextManager[Served]]


def _local(model_dir: str, engine: Engine, values: dict[str, Any] | None) -> AbstractContextManager[Served]:
    return local_server(model_dir, engine=engine, values=values)


def engine_for(dirs: list[str], chosen: Engine | None = None) -> Engine:
    """The request's engine (the load step's), else vLLM; the fallback when either artifact needs it: both sides
    must be measured on the same engine."""
    if chosen == "transformers" or any(choose_engine(d)[0] == "transformers" for d in dirs):
        return "transformers"
    return "vllm"


def run(request: CapacityRequest, serve: Serve = _local) -> tuple[CapacityReport, bool]:
    """Raises: TerminalError (a model does not serve), TransientError (a server died while measured)."""
    profile: LoadProfile = request.gate.profile
    prompts: PromptSet = synthetic_prompts(profile.prompt_tokens, Path(request.model_dir))
    dirs = [request.model_dir] + ([request.incumbent_dir] if request.incumbent_dir else [])
    engine = engine_for(dirs, request.engine)
    with ExitStack() as stack:
        servers = [stack.enter_context(serve(d, engine, request.values)) for d in dirs]
        by_url = {s.url: s for s in servers}

        def runner(target: Target, p: LoadProfile, ps: PromptSet) -> LoadReport:
            server = by_url[target.endpoint]
            report = run_load(target, p, ps, timeout_s=request.timeout_s)
            server.check_alive()
            return report.model_copy(update={"served_by": server.served_by})

        targets = [Target(endpoint=s.url, model=s.model) for s in servers]
        report = measure(
            targets[0],
            targets[1] if len(targets) > 1 else None,
            profile,
            request.gate.slo,
            request.policy.sweep,
            prompts,
            runner=runner,
            timeout_s=request.timeout_s,
        )
    return report, False
