"""Streaming load test against an OpenAI-compatible endpoint -> LoadReport; its SLO gate -> GateResult.

Users feel a model through time to first token (TTFT) and the pace of tokens after it (inter-token latency,
ITL). The generator streams ``/v1/chat/completions`` or ``/v1/completions`` over one reused aiohttp connection
pool (aiohttp, not httpx: in the same run it sustains several times httpx's request rate on 2 cores, see
benchmarks/loadgen.py), either at a constant or Poisson request rate (open loop) or with a fixed number of
concurrent streams (closed loop), after a warm-up, bounded by duration and by request count. A process
starts it in about half a second (guidellm: about 20 s), so a gate can run at every canary step.

Example:
    >>> report = run_load(Target("http://127.0.0.1:8000", "m"), LoadProfile(rate=5), synthetic_prompts(64))
    ...  # doctest: +SKIP
    >>> gate(report, Slo(latency_ms={"ttft_p95": 300})).passed  # doctest: +SKIP
    True
"""

from pipeline.loadtest.generator import load, run_load
from pipeline.loadtest.guidellm import from_guidellm, run_guidellm
from pipeline.loadtest.plot import plot_cdf
from pipeline.loadtest.prompts import PromptSet, file_prompts, synthetic_prompts
from pipeline.loadtest.report import (
    QUANTILES,
    LoadReport,
    Progress,
    RequestRecord,
    Stats,
    Target,
    gate,
    load_slo,
    needed_samples,
    stats,
    summarize,
)

__all__ = [
    "QUANTILES",
    "LoadReport",
    "Progress",
    "PromptSet",
    "RequestRecord",
    "Stats",
    "Target",
    "file_prompts",
    "from_guidellm",
    "gate",
    "load",
    "load_slo",
    "needed_samples",
    "plot_cdf",
    "run_guidellm",
    "run_load",
    "stats",
    "summarize",
    "synthetic_prompts",
]
