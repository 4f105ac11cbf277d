"""The load gate against a served artifact: the client's measurements plus the server's own view.

``measure`` runs the load against a running :class:`~pipeline.serve.LocalServer` while watching its ``/metrics``
(vLLM only), then checks the server survived the window: a server that died mid-load ends the gate with an
error naming its exit code and log tail, rather than a report that blames the model for refused connections.
``load_gate_served`` starts the server (vLLM by default, with the chart's args), measures, judges, and always
stops it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from pipeline.config import LoadProfile, Slo
from pipeline.gates import GateResult
from pipeline.loadtest.generator import run_load
from pipeline.loadtest.metrics import observe
from pipeline.loadtest.prompts import PromptSet, synthetic_prompts
from pipeline.loadtest.report import LoadReport, Progress, Target, gate
from pipeline.serve import Engine, LocalServer, local_server


def measure(
    server: LocalServer,
    profile: LoadProfile,
    prompts: PromptSet,
    timeout_s: float = 120.0,
    on_progress: Callable[[Progress], None] | None = None,
    ignore_eos: bool = True,
) -> LoadReport:
    """Load-test ``server``; for vLLM, add its /metrics view of the window (histogram deltas, queue depth).

    With vLLM and ``ignore_eos``, every request generates the profile's ``max_tokens`` (production-like load: a
    small model may otherwise stop at once); `transformers serve` has no such field.

    Raises:
        TransientError: the server died during the load (exit code and log tail in the message).
    """
    if server.engine != "vllm":
        target = Target(server.url, server.model)
        report = run_load(target, profile, prompts, timeout_s=timeout_s, on_progress=on_progress)
        server.check_alive()
        return report.model_copy(update={"served_by": server.served_by})
    target = Target(server.url, server.model, extra_body=(("ignore_eos", True),) if ignore_eos else ())
    server.check_alive()
    try:
        with observe(server.url) as seen:
            report = run_load(target, profile, prompts, timeout_s=timeout_s, on_progress=on_progress)
    except httpx.HTTPError:
        server.check_alive()  # gone before the window: name that, not the HTTP error
        raise
    server.check_alive()
    return report.model_copy(update={"server": seen.view, "served_by": server.served_by})


def load_gate_served(
    model_dir: Path,
    profile: LoadProfile,
    slo: Slo,
    *,
    engine: Engine = "vllm",
    values: dict[str, Any] | None = None,
    log_dir: Path | None = None,
) -> tuple[LoadReport, GateResult]:
    """Serve ``model_dir`` (the chart's args for ``values``), load-test it, judge it by ``slo``; always stop it.

    Raises:
        TerminalError: the server cannot start on this artifact (its own reason in the message).
        TransientError: the server did not come up in time, or died during the load.
    """
    prompts = synthetic_prompts(profile.prompt_tokens, model_dir)
    with local_server(model_dir, engine=engine, values=values, log_dir=log_dir) as server:
        report = measure(server, profile, prompts)
    return report, gate(report, slo)
