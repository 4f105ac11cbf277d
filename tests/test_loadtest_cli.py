"""`modelctl loadtest` as a user runs it: a summary table, the SLO verdict, --json, exit codes."""

from __future__ import annotations

import json
from pathlib import Path

from loadservers import MODEL, Behaviour, running
from typer.testing import CliRunner

from pipeline.cli import app

runner = CliRunner()


def _slo(tmp_path: Path, ttft_ms: int) -> Path:
    file = tmp_path / "slo.yaml"
    file.write_text(f"latency_ms:\n  ttft_p95: {ttft_ms}\nmax_error_rate: 0.01\nmin_requests: 10\n")
    return file


def test_loadtest_prints_a_summary_and_passes_the_slo(tmp_path: Path) -> None:
    with running(Behaviour()) as server:
        args = ["loadtest", "--endpoint", server.url, "--model", MODEL, "--rate", "30", "--duration", "1"]
        args += ["--warmup", "0", "--slo", str(_slo(tmp_path, 500)), "--plot", str(tmp_path / "cdf.png")]
        result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "time to first token" in result.output and "load gate: PASS" in result.output
    assert "30 requests, 30 ok, errors: none" in result.output
    assert (tmp_path / "cdf.png").stat().st_size > 0


def test_loadtest_json_reports_a_failed_gate_with_exit_code_2(tmp_path: Path) -> None:
    with running(Behaviour(status=500)) as server:
        args = ["loadtest", "--endpoint", server.url, "--model", MODEL, "--concurrency", "2", "--duration", "5"]
        args += ["--warmup", "0", "--max-requests", "12", "--slo", str(_slo(tmp_path, 500)), "--json"]
        result = runner.invoke(app, args)
    assert result.exit_code == 2
    data = json.loads(result.stdout)
    assert data["ok"] is False and data["gate"]["verdict"] == "fail"
    assert data["report"]["errors"] == {"http_500": 12} and "requests" not in data["report"]
    assert any(row["name"] == "error_rate" and "http_500: 12" in row["why"] for row in data["gate"]["rows"])


def test_loadtest_refuses_bad_input_before_sending_anything(tmp_path: Path) -> None:
    bad_slo = tmp_path / "slo.yaml"
    bad_slo.write_text("latency_ms:\n  ttft_p96: 300\n")
    with running(Behaviour()) as server:
        base = ["loadtest", "--endpoint", server.url, "--model", MODEL, "--duration", "1"]
        both = runner.invoke(app, [*base, "--rate", "5", "--concurrency", "2"])
        slo = runner.invoke(app, [*base, "--rate", "5", "--slo", str(bad_slo)])
        assert server.counters.requests == 0
    assert both.exit_code == 2 and "exactly one of 'rate'" in both.output
    assert slo.exit_code == 2 and "latency_ms.ttft_p96" in slo.output and "Traceback" not in slo.output
