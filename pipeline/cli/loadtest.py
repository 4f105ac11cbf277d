"""`modelctl loadtest`: a streaming load test against an OpenAI-compatible endpoint, optionally gated on an SLO."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal

import typer
from rich.table import Table

from pipeline.cli.render import JsonFlag, emit_json, err, errors, out

if TYPE_CHECKING:
    from pipeline.gates import GateResult
    from pipeline.loadtest import LoadReport


def register(app: typer.Typer) -> None:
    app.command("loadtest")(loadtest)


def loadtest(
    endpoint: Annotated[str, typer.Option(help="base URL of the server, e.g. http://127.0.0.1:8000")],
    model: Annotated[str, typer.Option(help="model name the server answers for")],
    rate: Annotated[float | None, typer.Option(help="open loop: requests per second")] = None,
    concurrency: Annotated[int | None, typer.Option(help="closed loop: parallel streams")] = None,
    duration: Annotated[float, typer.Option(help="seconds of measured load")] = 20.0,
    warmup: Annotated[float, typer.Option(help="seconds of unmeasured load first")] = 2.0,
    max_requests: Annotated[int | None, typer.Option(help="stop after this many measured requests")] = None,
    poisson: Annotated[bool, typer.Option(help="Poisson arrivals instead of a constant rate")] = False,
    prompt_tokens: Annotated[int, typer.Option(help="synthetic prompt length in tokens")] = 64,
    max_tokens: Annotated[int, typer.Option(help="max output tokens per request")] = 32,
    api: Annotated[str, typer.Option(help="chat (/v1/chat/completions) or completions (/v1/completions)")] = "chat",
    tokenizer: Annotated[Path | None, typer.Option(help="model dir whose tokenizer.json sizes the prompts")] = None,
    prompts: Annotated[Path | None, typer.Option(help='JSONL file of {"prompt": ...} instead')] = None,
    slo: Annotated[Path | None, typer.Option(help="YAML file of SLO keys: gate the result on it")] = None,
    timeout: Annotated[float, typer.Option(help="seconds before one request counts as timed out")] = 60.0,
    api_key_env: Annotated[str | None, typer.Option(help="environment variable holding a bearer token")] = None,
    engine: Annotated[str, typer.Option(help="modelctl (built in) or guidellm (if installed; needs --tokenizer)")] = (
        "modelctl"
    ),
    plot: Annotated[Path | None, typer.Option(help="write a PNG of the latency CDFs here")] = None,
    server_metrics: Annotated[
        bool, typer.Option("--server-metrics", help="also read vLLM's /metrics around the window (server's view)")
    ] = False,
    report_file: Annotated[Path | None, typer.Option("--report", help="write the full report (JSON) here")] = None,
    as_json: JsonFlag = False,
) -> None:
    """Stream load at an OpenAI-compatible endpoint; print TTFT, ITL and end-to-end latency, and the SLO verdict.

    Exits 0 when the SLO passed (or none was given), 2 when it failed or was inconclusive or the input is bad.
    """
    from contextlib import ExitStack

    from pydantic import ValidationError

    from pipeline import loadtest as lt
    from pipeline.config import LoadProfile
    from pipeline.errors import TerminalError
    from pipeline.loadtest.metrics import observe

    with errors(as_json):
        try:
            chosen_api: Literal["chat", "completions"] = "completions" if api == "completions" else "chat"
            if api not in ("chat", "completions"):
                raise TerminalError(f"--api must be 'chat' or 'completions' (got {api!r})")
            profile = LoadProfile(
                rate=rate, concurrency=concurrency, poisson=poisson, duration_s=duration, warmup_s=warmup,
                max_requests=max_requests, prompt_tokens=prompt_tokens, max_tokens=max_tokens, api=chosen_api,
            )  # fmt: skip
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'options'}: {e['msg']}" for e in exc.errors())
            raise TerminalError(f"bad load profile: {problems}", hint="see modelctl loadtest --help") from None
        objective = lt.load_slo(slo) if slo else None
        prompt_set = lt.file_prompts(prompts) if prompts else lt.synthetic_prompts(prompt_tokens, tokenizer)
        target = lt.Target(endpoint, model, api_key_env)
        if engine == "guidellm":
            if tokenizer is None:
                raise TerminalError("engine 'guidellm' needs --tokenizer (a model directory)")
            report = lt.run_guidellm(target, profile, tokenizer)
        elif engine != "modelctl":
            raise TerminalError(f"--engine must be 'modelctl' or 'guidellm' (got {engine!r})")
        else:
            with ExitStack() as stack:
                seen = stack.enter_context(observe(endpoint)) if server_metrics else None
                if as_json:
                    report = lt.run_load(target, profile, prompt_set, timeout_s=timeout)
                else:
                    status = stack.enter_context(err.status("starting"))

                    def show(p: lt.Progress) -> None:
                        phase = "warming up" if p.warming_up else "measuring"
                        seconds = f"{max(p.elapsed_s, 0):5.1f}/{duration:g} s"
                        status.update(f"{phase} {seconds}  sent {p.sent}  done {p.done}  failed {p.failed}")

                    report = lt.run_load(target, profile, prompt_set, timeout_s=timeout, on_progress=show)
            if seen is not None:
                report = report.model_copy(update={"server": seen.view})
        result = lt.gate(report, objective) if objective else None
        if plot:
            lt.plot_cdf(report, plot, objective)
        if report_file:
            report_file.parent.mkdir(parents=True, exist_ok=True)
            report_file.write_text(report.model_dump_json(indent=2), encoding="utf-8")
    passed = result is None or result.passed
    if as_json:
        gate_json = None if result is None else {"verdict": result.verdict, **result.model_dump(mode="json")}
        emit_json({"ok": passed, "report": report.summary_json(), "gate": gate_json, "plot": plot and str(plot)})
    else:
        _print(report)
        if result is not None:
            _print_gate(result)
        if plot:
            out.print(f"latency CDFs written to {plot}")
    if not passed:
        raise typer.Exit(2)


def _print(report: LoadReport) -> None:
    table = Table("latency (ms)", "p50", "p90", "p95", "p99", "mean", "n", title=f"{report.model} @ {report.endpoint}")
    for label, st in (("time to first token", report.ttft_ms), ("inter-token", report.itl_ms),
                      ("end to end", report.e2e_ms), ("output tokens", report.output_tokens)):  # fmt: skip
        cells = ["-" if v is None else f"{v:.1f}" for v in (st.p50, st.p90, st.p95, st.p99, st.mean)]
        table.add_row(label, *cells, str(st.count))
    server = report.server
    if server is not None:  # vLLM's own histograms over the same window
        for label, st in (("server: time to first token", server.ttft_ms), ("server: inter-token", server.itl_ms)):
            cells = ["-" if v is None else f"{v:.1f}" for v in (st.p50, st.p90, st.p95, st.p99, st.mean)]
            table.add_row(label, *cells, str(st.count))
    out.print(table)
    if server is not None:
        out.print(
            f"server: {server.requests} requests in the window; queue (waiting) max {server.queue_waiting_max}, "
            f"mean {server.queue_waiting_mean}" + (f"; {server.note}" if server.note else "")
        )
    target = f" of {report.target_rate:g} target ({report.rate_ratio:.0%})" if report.rate_ratio is not None else ""
    errs = ", ".join(f"{k} {v}" for k, v in sorted(report.errors.items())) or "none"
    achieved = "-" if report.achieved_rate is None else f"{report.achieved_rate:.1f}"
    out.print(
        f"{report.requests_total} requests, {report.successes} ok, errors: {errs} ({report.error_rate:.1%}); "
        f"{achieved} req/s{target}; {report.output_tokens_per_s:.1f} output tokens/s; prompts: {report.prompt_source}"
    )


def _print_gate(result: GateResult) -> None:
    table = Table("check", "value", "limit", "verdict", "why", title=f"load gate: {result.verdict.upper()}")
    colors = {"pass": "green", "fail": "red", "inconclusive": "yellow"}
    for row in result.rows:
        value = "-" if row.value is None else f"{row.value:.4g}"
        table.add_row(row.name, value, row.limit, f"[{colors[row.verdict]}]{row.verdict}[/]", row.why)
    out.print(table)
