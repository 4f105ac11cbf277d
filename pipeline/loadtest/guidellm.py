"""guidellm as an engine behind the same interface: run it, read its JSON into a LoadReport."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipeline.config import LoadProfile
from pipeline.errors import TerminalError
from pipeline.loadtest.report import LoadReport, RequestRecord, Target, summarize
from pipeline.secrets import redact


def from_guidellm(data: dict[str, Any], target: Target, profile: LoadProfile) -> LoadReport:
    """Read a guidellm JSON report (its first benchmark's per-request stats) into the same LoadReport.

    Raises:
        TerminalError: the data is not a guidellm report with per-request stats.
    """
    try:
        groups = data["benchmarks"][0]["requests"]
        rows: list[tuple[dict[str, Any], str | None]] = [(r, None) for r in groups.get("successful") or []]
        rows += [(r, "guidellm_error") for r in groups.get("errored") or []]  # "incomplete": cut off by the clock
        first = min(float(r["request_start_time"]) for r, _ in rows) if rows else 0.0
        records = []
        for r, error in rows:
            tokens = int(r.get("output_tokens") or 0)
            itl = (r.get("inter_token_latency_ms") or 0.0) / 1000
            ttft = r.get("time_to_first_token_ms")
            records.append(RequestRecord(
                start_s=float(r["request_start_time"]) - first, error=error, output_tokens=tokens if not error else 0,
                ttft_s=None if error or ttft is None else ttft / 1000, e2e_s=None if error else r["request_latency"],
                itl_s=[] if error else [itl] * max(tokens - 1, 0),
            ))  # fmt: skip
        duration = float(data["benchmarks"][0].get("duration") or profile.duration_s)
    except (KeyError, IndexError, TypeError, ValueError) as exc:
        raise TerminalError(f"not a guidellm report with per-request stats ({type(exc).__name__}: {exc})") from None
    report = summarize(target, profile, "guidellm synthetic_text", records, duration)
    return report.model_copy(update={"engine": "guidellm"})


def run_guidellm(target: Target, profile: LoadProfile, tokenizer_dir: Path, executable: str = "guidellm") -> LoadReport:
    """The same load test through guidellm (when installed; it starts in ~20 s), read into a LoadReport.

    Raises:
        TerminalError: guidellm is not installed, or it failed (its output tail is in the message).
    """
    import shutil
    import subprocess
    import tempfile

    binary = shutil.which(executable)
    if binary is None:
        raise TerminalError(f"engine 'guidellm' needs {executable!r} on PATH", hint="pip install guidellm, or use "
                            "the built-in engine")  # fmt: skip
    mode = f"kind=constant,rate={profile.rate}" if profile.rate else f"kind=concurrent,streams={profile.concurrency}"
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "report.json"
        cmd = [binary, "run", "--backend", f"kind=openai_http,target={target.endpoint},model={target.model}",
               "--profile", mode, "--constraint", f"kind=max_duration,seconds={profile.duration_s}",
               "--tokenizer", f"kind=huggingface_auto,model={tokenizer_dir}", "--disable-console-interactive",
               "--data", f"kind=synthetic_text,prompt_tokens={profile.prompt_tokens},"
               f"output_tokens={profile.max_tokens}",
               "--output", f"kind=json,path={out}"]  # fmt: skip
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode != 0 or not out.exists():
            tail = redact((done.stderr or done.stdout)[-800:])
            raise TerminalError(
                f"guidellm exited with code {done.returncode}: {tail}", hint="run it by hand to see why"
            )
        return from_guidellm(json.loads(out.read_text()), target, profile)
