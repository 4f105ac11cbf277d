"""`modelctl evaluate`: run an eval suite on local weights or an endpoint, and gate it against a baseline."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from pipeline.cli.render import JsonFlag, emit_json, errors, out, progress

if TYPE_CHECKING:
    from pipeline.evaluate import EvalReport
    from pipeline.gates import GateResult


def register(app: typer.Typer) -> None:
    app.command("evaluate")(evaluate)


def evaluate(
    artifact: Annotated[
        Path | None, typer.Argument(help="model directory: a quantized artifact or a saved model")
    ] = None,
    endpoint: Annotated[
        str | None, typer.Option(help="OpenAI-compatible server instead, e.g. http://127.0.0.1:8000")
    ] = (None),
    model: Annotated[str | None, typer.Option(help="with --endpoint: the model name the server answers for")] = None,
    suite: Annotated[str, typer.Option(help="suite name under evaluations/suites/, or a suite YAML path")] = "smoke",
    baseline: Annotated[
        Path | None, typer.Option(help="the incumbent's EvalReport JSON or PromotionRecord; else the floors judge")
    ] = None,
    output: Annotated[Path | None, typer.Option(help="write the EvalReport JSON here (usable as a --baseline)")] = None,
    backend: Annotated[str, typer.Option(help="local weights: hf, or vllm (needs a GPU)")] = "hf",
    device: Annotated[str, typer.Option(help="local weights: cpu or cuda")] = "cpu",
    num_concurrent: Annotated[int, typer.Option(help="with --endpoint: parallel requests")] = 4,
    tokenizer: Annotated[str | None, typer.Option(help="with --endpoint: tokenizer for loglikelihood tasks")] = None,
    api_key_env: Annotated[str | None, typer.Option(help="with --endpoint: variable holding a bearer token")] = None,
    online: Annotated[bool, typer.Option("--online", help="allow Hub downloads (datasets); offline by default")] = (
        False
    ),
    no_cache: Annotated[bool, typer.Option("--no-cache", help="evaluate again even if a result is cached")] = False,
    served: Annotated[
        bool, typer.Option("--served", help="serve ARTIFACT with vLLM (the chart's args) and evaluate through it")
    ] = False,
    values: Annotated[
        Path | None, typer.Option(help="with --served: the environment's chart values file (default: local)")
    ] = None,
    report_only: Annotated[
        bool, typer.Option("--report-only", help="exit 0 whatever the gate says (a pipeline Job: the flow judges)")
    ] = False,
    as_json: JsonFlag = False,
) -> None:
    """Evaluate a candidate on a suite with lm-eval and judge it against the baseline (or the suite's floors).

    Exits 0 when the gate passed, 2 when it failed or was inconclusive or the input is bad.
    """
    from pipeline import evaluate as ev
    from pipeline.errors import TerminalError

    with errors(as_json):
        target: ev.Target
        if (artifact is None) == (endpoint is None):
            raise TerminalError(
                "give exactly one of ARTIFACT (a model directory) or --endpoint URL",
                hint="modelctl evaluate demo-output/tiny --suite smoke, or --endpoint URL --model NAME",
            )
        if endpoint is not None:
            if not model:
                raise TerminalError("--endpoint needs --model (the name the server answers for)")
            target = ev.Endpoint(endpoint, model, num_concurrent, tokenizer, api_key_env)
        else:
            if backend not in ("hf", "vllm"):
                raise TerminalError(f"--backend must be 'hf' or 'vllm' (got {backend!r})")
            target = ev.LocalWeights(Path(artifact or "."), backend, device)  # type: ignore[arg-type]
        if served and artifact is None:
            raise TerminalError("--served needs ARTIFACT (the model directory vLLM should serve)")
        chosen = ev.load_suite(suite)
        incumbent = ev.load_baseline(baseline) if baseline else None
        if served:
            from pipeline.evaluate.endpoint import evaluate_served
            from pipeline.vllm import load_values

            report = evaluate_served(Path(artifact or "."), chosen, values=load_values(values), use_cache=not no_cache)
        else:
            with progress(not as_json) as update:
                report = ev.evaluate(target, chosen, use_cache=not no_cache, offline=not online, progress=update)
        result = ev.eval_gate(report, incumbent, chosen)
        if output:
            output.parent.mkdir(parents=True, exist_ok=True)
            output.write_text(report.model_dump_json(indent=2) + "\n", encoding="utf-8")
    if as_json:
        emit_json(
            {
                "ok": result.passed,
                "cached": report.skipped,
                "report": report.model_dump(mode="json"),
                "gate": {"verdict": result.verdict, **result.model_dump(mode="json")},
                "output": output and str(output),
            }
        )
    else:
        _print(report)
        _print_gate(result)
        if output:
            out.print(f"report written to {output}")
    if not result.passed and not report_only:
        raise typer.Exit(2)


def _print(report: EvalReport) -> None:
    cached = ", cached" if report.skipped else ""
    title = f"{report.suite} suite: {report.subject} ({report.backend}, lm-eval {report.lm_eval_version}{cached})"
    table = Table("task", "metric", "value", "stderr", "n", title=title)
    for task, metric, value in report.rows():
        stderr = "-" if value.stderr is None else f"{value.stderr:.4f}"
        table.add_row(task, metric, f"{value.value:.4f}", stderr, str(value.n or "-"))
    out.print(table)
    out.print(f"evaluated in {report.seconds:.1f} s" + (" (this run: from the cache)" if report.skipped else ""))


def _print_gate(result: GateResult) -> None:
    table = Table("check", "value", "baseline", "limit", "verdict", "why", title=f"eval gate: {result.verdict.upper()}")
    colors = {"pass": "green", "fail": "red", "inconclusive": "yellow"}
    for row in result.rows:
        value = "-" if row.value is None else f"{row.value:.4g}"
        if row.stderr is not None and row.value is not None:
            value += f" ± {row.stderr:.2g}"
        base = "-" if row.baseline is None else f"{row.baseline:.4g}"
        table.add_row(row.name, value, base, row.limit, f"[{colors[row.verdict]}]{row.verdict}[/]", row.why)
    out.print(table)
