"""The load generator and its SLO gate, against real streaming servers on 127.0.0.1 (tests/loadservers.py)."""

from __future__ import annotations

import json
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import pytest
from loadservers import MODEL, Behaviour, running

from pipeline.config import LoadProfile, Slo
from pipeline.errors import TerminalError
from pipeline.gates import GateResult
from pipeline.loadtest import (
    LoadReport,
    RequestRecord,
    Target,
    file_prompts,
    from_guidellm,
    gate,
    needed_samples,
    plot_cdf,
    run_guidellm,
    run_load,
    stats,
    summarize,
    synthetic_prompts,
)

PROMPTS = synthetic_prompts(16)
# Limits far above what a healthy local server needs: the tests share 2 busy cores with other work.
SLO = Slo(latency_ms={"ttft_p95": 500, "e2e_p95": 1000, "itl_p95": 250}, max_error_rate=0.01, min_requests=20)
OPEN = LoadProfile(rate=40, duration_s=1.0, warmup_s=0.2, max_tokens=8)


def _load(behaviour: Behaviour, profile: LoadProfile = OPEN, timeout_s: float = 5.0) -> LoadReport:
    with running(behaviour) as server:
        report = run_load(Target(server.url, MODEL), profile, PROMPTS, timeout_s=timeout_s)
        assert server.counters.rejected == [], "the generator sent a field or model a strict server refuses"
    return report


def _row(result: GateResult, name: str) -> tuple[str, str]:
    row = next(r for r in result.rows if r.name == name)
    return row.verdict, row.why


def test_healthy_server_passes_the_slo() -> None:
    report = _load(Behaviour(tokens=8, itl=0.001))
    result = gate(report, SLO)
    assert result.passed, result.summary()
    assert report.requests_total == report.successes == 40  # 1 s at 40 req/s; the warm-up is not counted
    assert report.errors == {} and report.error_rate == 0
    assert report.output_tokens.p50 == 8 and report.itl_ms.count == 40 * 7
    assert report.rate_ratio is not None and report.rate_ratio >= 0.95
    assert [row.name for row in result.rows] == ["ttft_p95", "e2e_p95", "itl_p95", "error_rate", "rate_ratio"]
    assert all(row.why for row in result.rows)


def test_delayed_first_token_fails_on_ttft_only() -> None:
    report = _load(Behaviour(ttft_delay=0.6))
    result = gate(report, Slo(latency_ms={"ttft_p95": 500, "itl_p95": 250}))
    assert not result.passed and result.verdict == "fail"
    verdict, why = _row(result, "ttft_p95")
    assert verdict == "fail" and "exceeds 500 ms" in why
    assert report.ttft_ms.p50 is not None and report.ttft_ms.p50 >= 600  # the server's delay is a floor
    assert [r.name for r in result.failures] == ["ttft_p95"]


@pytest.mark.parametrize(
    ("behaviour", "kind"),
    [(Behaviour(status=500), "http_500"), (Behaviour(hang=True), "timeout"), (Behaviour(cut_after=3), "stream_cut")],
    ids=["500s", "timeouts", "cut-streams"],
)
def test_broken_servers_count_errors_by_kind_and_fail(behaviour: Behaviour, kind: str) -> None:
    profile = LoadProfile(rate=40, duration_s=0.5, warmup_s=0, max_tokens=8)
    report = _load(behaviour, profile, timeout_s=0.5)
    assert report.errors == {kind: report.requests_total} and report.requests_total == 20
    assert report.error_rate == 1.0 and report.successes == 0
    result = gate(report, SLO)
    assert result.verdict == "fail"
    verdict, why = _row(result, "error_rate")
    assert verdict == "fail" and f"{kind}: 20" in why
    assert _row(result, "ttft_p95")[0] == "inconclusive"  # nothing to estimate a latency from, never a pass


def test_a_server_that_cannot_keep_up_fails_the_rate_check() -> None:
    # one slot busy 50 ms per request: 20 req/s at most, offered 40 req/s
    report = _load(Behaviour(slots=1, service_time=0.05))
    result = gate(report, Slo(min_rate_ratio=0.95))
    verdict, why = _row(result, "rate_ratio")
    assert verdict == "fail" and "cannot keep up" in why
    assert report.achieved_rate is not None and report.achieved_rate < 25
    assert report.sent_rate > 30  # the generator itself kept the offered rate


def test_closed_loop_is_bounded_by_the_request_count() -> None:
    profile = LoadProfile(concurrency=4, duration_s=30, warmup_s=0, max_requests=30, api="completions")
    report = _load(Behaviour(tokens=5), profile)
    assert report.mode == "concurrency" and report.requests_total == 30 and report.successes == 30
    assert report.output_tokens.mean == 5
    verdict, why = _row(gate(report, Slo()), "rate_ratio")
    assert verdict == "pass" and "closed loop" in why


def test_warmup_requests_are_sent_but_not_measured() -> None:
    profile = LoadProfile(rate=50, duration_s=0.4, warmup_s=0.4)
    with running(Behaviour()) as server:
        report = run_load(Target(server.url + "/v1", MODEL), profile, PROMPTS)
        assert server.counters.requests == 40
    assert report.requests_total == 20


def test_poisson_arrivals_keep_the_mean_rate() -> None:
    report = _load(Behaviour(), LoadProfile(rate=100, poisson=True, duration_s=1.0, warmup_s=0))
    assert 60 <= report.requests_total <= 140  # Poisson(100): more than 4 standard deviations either side
    starts = sorted(r.start_s for r in report.requests)
    gaps = np.diff(starts)
    assert gaps.std() / gaps.mean() > 0.6  # exponential gaps vary as much as their mean; a constant rate's do not


def test_too_few_successes_is_inconclusive_not_a_pass() -> None:
    report = _load(Behaviour(), LoadProfile(concurrency=1, duration_s=10, warmup_s=0, max_requests=10))
    result = gate(report, Slo(latency_ms={"ttft_p99": 10_000}, min_requests=5))
    verdict, why = _row(result, "ttft_p99")
    assert verdict == "inconclusive" and "needs at least 100" in why
    assert not result.passed and result.verdict == "inconclusive"


def test_percentiles_match_numpy_and_the_sample_rule() -> None:
    values = [0.001 * v for v in (5, 1, 9, 3, 7, 2, 8, 4, 6, 10, 13)]
    got = stats(values)
    for name, q in (("p50", 50), ("p90", 90), ("p95", 95), ("p99", 99)):
        assert getattr(got, name) == pytest.approx(np.percentile(np.array(values) * 1000, q), abs=1e-3)
    assert stats([]).p95 is None
    slo = Slo(min_requests=20)
    assert [needed_samples(k, slo) for k in ("ttft_p50", "e2e_p95", "itl_p99")] == [20, 20, 100]


def test_gate_is_pure_and_explains_every_row() -> None:
    records = [RequestRecord(start_s=i * 0.1, ttft_s=0.05, e2e_s=0.2, output_tokens=4) for i in range(30)]
    records += [RequestRecord(start_s=3.0, error="http_503")]
    report = summarize(Target("http://x", "m"), LoadProfile(rate=10, duration_s=3), "test", records, 3.2)
    assert report.ttft_ms.p95 == pytest.approx(50) and report.errors == {"http_503": 1}
    result = gate(report, Slo(latency_ms={"ttft_p95": 60}, max_error_rate=0.01))
    assert _row(result, "ttft_p95")[0] == "pass"
    verdict, why = _row(result, "error_rate")
    assert verdict == "fail" and why == "1 of 31 requests failed (http_503: 1)"
    assert "error_rate" in result.markdown()


def test_synthetic_prompts_have_the_exact_token_length(tiny_model: Path) -> None:
    from tokenizers import Tokenizer

    prompts = synthetic_prompts(24, tiny_model, count=16)
    tok = Tokenizer.from_file(str(tiny_model / "tokenizer.json"))
    assert {len(tok.encode(p, add_special_tokens=False).ids) for p in prompts.texts} == {24}
    assert len(set(prompts.texts)) == 16  # distinct, so a prefix cache cannot flatter the server
    with pytest.raises(TerminalError, match="tokenizer"):
        synthetic_prompts(24, tiny_model / "missing")


def test_prompt_files_are_validated_with_the_line_named(tmp_path: Path) -> None:
    good = tmp_path / "good.jsonl"
    good.write_text('{"prompt": "hello"}\n\n{"prompt": "world"}\n')
    assert file_prompts(good).texts == ("hello", "world")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "hello"}\n{"text": "no prompt key"}\n')
    with pytest.raises(TerminalError, match=r"bad.jsonl:2: expected an object with a non-empty 'prompt'"):
        file_prompts(bad)


def test_tokens_never_leak_into_reports_or_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    secret = "hf_SeCrEtToKeN1234567890"
    monkeypatch.setenv("MODEL_API_KEY", secret)
    with running(Behaviour()) as server:
        report = run_load(Target(server.url, MODEL, api_key_env="MODEL_API_KEY"), OPEN, PROMPTS)
        assert server.counters.authorizations == {f"Bearer {secret}"}  # the token was used ...
        assert report.successes == 40
        assert secret not in json.dumps(report.model_dump(mode="json"))  # ... and is nowhere in the report
        with pytest.raises(TerminalError, match="carries credentials") as caught:
            run_load(Target(server.url.replace("//", f"//user:{secret}@"), MODEL), OPEN, PROMPTS)
        assert secret not in str(caught.value) and server.counters.requests == 40 + 8  # nothing more was sent


def test_latency_cdf_plot_is_a_png(tmp_path: Path) -> None:
    report = _load(Behaviour(ttft_delay=0.01), LoadProfile(rate=40, duration_s=0.5, warmup_s=0))
    path = plot_cdf(report, tmp_path / "plots" / "latency.png", SLO)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000


# Three requests as guidellm 0.8.1 reported them (fields trimmed from a real run against tests/loadservers.py),
# plus one errored request.
GUIDELLM = {
    "benchmarks": [{
        "duration": 3.0,
        "requests": {
            "successful": [
                {"request_start_time": 1795353593.5753436, "request_latency": 0.011217117309570312,
                 "time_to_first_token_ms": 3.899812698364258, "output_tokens": 8,
                 "inter_token_latency_ms": 0.036069325038364956},
                {"request_start_time": 1795353593.6221538, "request_latency": 0.01691293716430664,
                 "time_to_first_token_ms": 4.955768585205078, "output_tokens": 8,
                 "inter_token_latency_ms": 1.0014261518205916},
                {"request_start_time": 1795353593.6759486, "request_latency": 0.019600391387939453,
                 "time_to_first_token_ms": 6.234645843505859, "output_tokens": 8,
                 "inter_token_latency_ms": 0.040973935808454244},
            ],
            "errored": [{"request_start_time": 1795353593.7, "request_latency": 0.001, "output_tokens": 0}],
        },
    }]
}  # fmt: skip


def test_a_guidellm_report_reads_into_the_same_load_report() -> None:
    report = from_guidellm(GUIDELLM, Target("http://x", MODEL), LoadProfile(rate=20, duration_s=3))
    assert report.engine == "guidellm" and report.requests_total == 4 and report.successes == 3
    assert report.errors == {"guidellm_error": 1}
    assert report.ttft_ms.p50 == pytest.approx(4.956, abs=1e-3) and report.output_tokens.mean == 8
    assert report.itl_ms.count == 3 * 7
    assert _row(gate(report, Slo(max_error_rate=0.5, min_requests=2)), "error_rate")[0] == "pass"
    with pytest.raises(TerminalError, match="not a guidellm report"):
        from_guidellm({"benchmarks": []}, Target("http://x", MODEL), LoadProfile(rate=1))
    with pytest.raises(TerminalError, match="needs 'no-such-guidellm' on PATH"):
        run_guidellm(Target("http://x", MODEL), LoadProfile(rate=1), Path("."), executable="no-such-guidellm")


def test_one_stalled_request_does_not_decide_the_achieved_rate() -> None:
    profile = LoadProfile(rate=40, duration_s=1)
    records = [RequestRecord(start_s=i / 40, ttft_s=0.001, e2e_s=0.002, output_tokens=8) for i in range(40)]
    records[-1] = RequestRecord(start_s=39 / 40, ttft_s=0.5, e2e_s=0.5, output_tokens=8)  # the last one stalls
    report = summarize(Target("http://x", "m"), profile, "test", records, 1.5)
    assert report.rate_ratio is not None and report.rate_ratio >= 0.95
    slow = [RequestRecord(start_s=i / 40, e2e_s=0.05 * (i + 1) - i / 40, output_tokens=8) for i in range(40)]
    report = summarize(Target("http://x", "m"), profile, "test", slow, 2.0)  # one at a time, 50 ms each
    assert report.rate_ratio == pytest.approx(0.5, abs=0.01)


def test_the_servers_own_view_is_the_window_between_two_metrics_snapshots() -> None:
    from pipeline.loadtest.metrics import observe

    # one slot held 20 ms per request, 4 streams: requests queue, and the server's TTFT includes the wait
    profile = LoadProfile(concurrency=4, duration_s=30, warmup_s=0, max_requests=24, api="completions")
    with running(Behaviour(tokens=3, slots=1, service_time=0.02, ttft_delay=0.01)) as server:
        run_load(Target(server.url, MODEL), profile.model_copy(update={"max_requests": 5}), PROMPTS)  # before
        with observe(server.url, interval_s=0.05) as seen:
            report = run_load(Target(server.url, MODEL), profile, PROMPTS, timeout_s=5.0)
    view = seen.view
    assert view is not None and view.note is None
    assert view.requests == report.requests_total == 24  # only the window's requests, not the 5 before it
    assert view.ttft_ms.count == 24 and view.ttft_ms.p50 is not None and view.ttft_ms.p50 >= 10.0
    assert view.queue_waiting_max is not None and view.queue_waiting_max >= 1  # requests waited for the slot


def test_a_server_gone_after_the_window_is_named_in_its_view() -> None:
    from pipeline.loadtest.metrics import observe

    with ExitStack() as stack:
        server = stack.enter_context(running(Behaviour()))
        with observe(server.url, interval_s=0.05) as seen:
            stack.close()  # the server stops inside the window
    assert seen.view is not None and seen.view.requests == 0
    assert "could not be read after the load window" in (seen.view.note or "")


def test_the_cli_prints_the_servers_view_next_to_the_clients(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from pipeline.cli import app

    with running(Behaviour(tokens=3)) as server:
        args = ["loadtest", "--endpoint", server.url, "--model", MODEL, "--concurrency", "2", "--duration", "30"]
        args += ["--warmup", "0", "--max-requests", "10", "--server-metrics"]
        shown = CliRunner().invoke(app, args)
        as_json = CliRunner().invoke(app, [*args, "--json"])
    assert shown.exit_code == 0, shown.output
    assert "server: time to first token" in shown.output and "server: 10 requests in the window" in shown.output
    view = json.loads(as_json.stdout)["report"]["server"]
    assert view["requests"] == 10 and view["ttft_ms"]["count"] == 10
