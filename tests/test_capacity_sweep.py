"""The capacity sweep, gate and plan: real sweeps against streaming servers on 127.0.0.1 whose capacity is set
(tests/loadservers.py: one or four slots, each busy 50 ms per request), a time bound driven by a fake clock, and
the plan's arithmetic on fixed inputs."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import pytest
from loadservers import MODEL, Behaviour, running

from pipeline.config import CapacityPolicy, CapacitySweep, LoadProfile, Slo, parse_config
from pipeline.errors import ConfigError, TerminalError
from pipeline.gates import GateResult
from pipeline.gitops.values import check_values, edit_values, scale_changes
from pipeline.loadtest import LoadReport, PromptSet, RequestRecord, Target, run_load, summarize, synthetic_prompts
from pipeline.loadtest.capacity import (
    CapacityMeasurement,
    CapacityReport,
    Runner,
    Sweep,
    capacity_gate,
    measure,
    sweep,
)
from pipeline.loadtest.capacity_plan import capacity_plan, plot_capacity, replica_changes

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = synthetic_prompts(16)
PROFILE = LoadProfile(rate=1, max_tokens=4)
# A 50 ms request takes ~60 ms here; past a server's capacity its queue grows and the achieved rate falls short
# (to under 80 % of the offered rate one step past it). Limits are loose: the tests share 2 busy cores.
SLO = Slo(latency_ms={"e2e_p50": 250}, min_requests=5, min_rate_ratio=0.8)
SETTINGS = CapacitySweep(
    start_rps=10, growth=3, max_rps=150, resolution=0.5, duration_s=0.5, warmup_s=0.1, budget_s=60, repetitions=3
)
POLICY = CapacityPolicy(max_regression=0.2, sweep=SETTINGS)
SLOW = Behaviour(tokens=4, slots=1, service_time=0.05)  # at most 20 req/s
FAST = Behaviour(tokens=4, slots=4, service_time=0.05)  # at most 80 req/s


def _row(result: GateResult, name: str) -> tuple[str, str]:
    row = next(r for r in result.rows if r.name == name)
    return row.verdict, row.why


@pytest.fixture(scope="module")
def slow_vs_fast() -> Iterator[CapacityReport]:
    """One run: the slow server as candidate, the fast one as incumbent, three interleaved sweeps each."""
    with running(SLOW) as slow, running(FAST) as fast:
        yield measure(Target(slow.url, MODEL), Target(fast.url, MODEL), PROFILE, SLO, SETTINGS, PROMPTS, timeout_s=5)


def test_a_slower_candidate_is_refused_naming_both_goodputs(slow_vs_fast: CapacityReport) -> None:
    report = slow_vs_fast
    cand, inc = report.candidate.median_goodput, report.incumbent and report.incumbent.median_goodput
    assert cand is not None and inc is not None and cand < inc  # the 20 req/s server below the 80 req/s one
    assert all(s.verdict == "pass" and s.stopped == "bracketed" for s in report.candidate.sweeps), [
        s.why for s in report.candidate.sweeps
    ]
    result = capacity_gate(report, POLICY)
    assert result.verdict == "fail"
    verdict, why = _row(result, "goodput vs incumbent")
    assert verdict == "fail"
    assert f"candidate {cand:.4g} req/s vs incumbent {inc:.4g} req/s" in why and "do not promote" in why
    assert _row(result, "candidate goodput")[0] == "pass"  # it holds the SLO, only at a lower rate
    # every rate tried is kept, with its percentiles, and the bracket brackets the goodput
    first = report.candidate.sweeps[0]
    assert [t.rate for t in first.trials][:2] == [10, 30]
    assert first.lo_rps == first.goodput_rps and first.hi_rps is not None
    assert first.hi_rps / first.lo_rps - 1 <= SETTINGS.resolution
    assert all(t.e2e_ms.p50 is not None for t in first.trials)
    assert any(t.verdict == "fail" for t in first.trials) and first.output_tokens_per_s


def test_a_faster_candidate_passes(slow_vs_fast: CapacityReport) -> None:
    assert slow_vs_fast.incumbent is not None
    swapped = CapacityReport(
        slo=SLO,
        sweep=SETTINGS,
        candidate=slow_vs_fast.incumbent.model_copy(update={"label": "candidate"}),
        incumbent=slow_vs_fast.candidate.model_copy(update={"label": "incumbent"}),
    )
    result = capacity_gate(swapped, POLICY)
    assert result.passed, result.summary()
    assert "no regression" in _row(result, "goodput vs incumbent")[1]


def test_the_plot_shows_both_sides_against_the_slo(slow_vs_fast: CapacityReport, tmp_path: Path) -> None:
    path = plot_capacity(slow_vs_fast, tmp_path / "capacity.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000


def test_a_server_that_fails_the_slo_at_every_rate_is_a_fail() -> None:
    with running(Behaviour(tokens=4, ttft_delay=0.4)) as server:
        report = measure(Target(server.url, MODEL), None, PROFILE, SLO, SETTINGS, PROMPTS, timeout_s=5)
    for s in report.candidate.sweeps:
        assert s.verdict == "fail" and s.goodput_rps is None
        assert [t.rate for t in s.trials] == [10]  # nothing above a failing lowest rate is tried
        assert "fails the SLO even at the lowest rate tried, 10 req/s" in s.why and "e2e_p50" in s.why
    result = capacity_gate(report, POLICY)
    assert result.verdict == "fail"
    verdict, why = _row(result, "candidate goodput")
    assert verdict == "fail" and "lowest rate tried" in why and "3 of 3 sweeps" in why


class FakeClock:
    """Time that moves only when a rate is run: each rate 'takes' ``per_rate`` seconds."""

    def __init__(self, per_rate: float) -> None:
        self.now = 1000.0
        self.per_rate = per_rate

    def __call__(self) -> float:
        return self.now

    def runner(self, target: Target, profile: LoadProfile, prompts: PromptSet) -> LoadReport:
        self.now += self.per_rate
        return run_load(target, profile, prompts, timeout_s=5)


def test_a_sweep_out_of_time_before_bracketing_is_inconclusive_and_refused() -> None:
    settings = SETTINGS.model_copy(update={"budget_s": 100.0})
    clock = FakeClock(per_rate=100.0)  # the first rate fits the budget; the second would end past it
    with running(FAST) as fast, running(FAST) as incumbent:
        report = measure(Target(fast.url, MODEL), Target(incumbent.url, MODEL), PROFILE, SLO, settings, PROMPTS,
                         clock=clock, runner=clock.runner)  # fmt: skip
    for s in report.candidate.sweeps:
        assert s.verdict == "inconclusive" and s.stopped == "budget" and len(s.trials) == 1
        assert s.trials[0].verdict == "pass" and s.goodput_rps is None and s.elapsed_s == 100.0
        assert "ran out of time before the goodput was bracketed: it passed up to 10 req/s" in s.why
    result = capacity_gate(report, POLICY.model_copy(update={"sweep": settings}))
    assert result.verdict == "inconclusive" and not result.passed
    verdict, why = _row(result, "goodput vs incumbent")
    assert verdict == "inconclusive" and "sweep 1 is inconclusive" in why and "budget" in why


def test_a_sweep_bracketed_before_its_time_runs_out_keeps_the_goodput_and_its_bracket() -> None:
    # 30 s of fake time per rate and a 70 s budget: three rates. The slow server (20 req/s at most) passes 10
    # and fails 30, so the goodput is bracketed; the fine resolution is not reached in time.
    settings = SETTINGS.model_copy(update={"budget_s": 70.0, "resolution": 0.01})
    clock = FakeClock(per_rate=30.0)
    with running(SLOW) as slow:
        result = sweep(Target(slow.url, MODEL), PROFILE, SLO, settings, PROMPTS, clock=clock, runner=clock.runner)
    assert [t.rate for t in result.trials] == [10, 30, 20]
    assert result.verdict == "pass" and result.stopped == "budget"
    assert result.lo_rps is not None and result.hi_rps is not None and result.goodput_rps == result.lo_rps
    assert f"bracket {result.lo_rps:g}-{result.hi_rps:g}, wider than the resolution: out of time" in result.why


def _scripted(capacity: float) -> Runner:
    """A load generator stand-in: each offered rate gets 50 ms requests up to ``capacity``, 500 ms beyond it."""

    def run(target: Target, profile: LoadProfile, prompts: PromptSet) -> LoadReport:
        rate = profile.rate or 1.0
        e2e = 0.05 if rate <= capacity else 0.5
        records = [
            RequestRecord(start_s=i / rate, ttft_s=e2e / 2, e2e_s=e2e, output_tokens=4)
            for i in range(math.ceil(rate * profile.duration_s))
        ]
        return summarize(target, profile, "scripted", records, profile.duration_s)

    return run


def test_the_stopping_rules_ramp_then_bisect_to_the_resolution() -> None:
    settings = CapacitySweep(start_rps=1, growth=2, max_rps=256, resolution=0.1, duration_s=10, warmup_s=0)
    result = sweep(Target("http://x", MODEL), PROFILE, SLO, settings, PROMPTS, runner=_scripted(37))
    assert [t.rate for t in result.trials] == [1, 2, 4, 8, 16, 32, 64, 48, 40, 36, 38]
    assert (result.verdict, result.stopped, result.goodput_rps, result.hi_rps) == ("pass", "bracketed", 36, 38)
    assert result.output_tokens_per_s == 144  # 36 req/s x 4 tokens
    ceiling = sweep(Target("http://x", MODEL), PROFILE, SLO, settings.model_copy(update={"max_rps": 100}), PROMPTS,
                    runner=_scripted(1000))  # fmt: skip
    assert [t.rate for t in ceiling.trials] == [1, 2, 4, 8, 16, 32, 64, 100]
    assert ceiling.at_ceiling and ceiling.goodput_rps == 100 and "at least" in ceiling.why


# --- the gate and the plan on fixed inputs ---------------------------------------------------------------


def _sweep(label: str, goodput: float | None, tokens: float | None = None, verdict: str = "pass",
           ceiling: bool = False) -> Sweep:  # fmt: skip
    return Sweep(
        label=label, verdict=verdict, goodput_rps=goodput, output_tokens_per_s=tokens, lo_rps=goodput,
        hi_rps=None if ceiling else (goodput or 1) * 1.1, at_ceiling=ceiling,
        stopped="ceiling" if ceiling else "bracketed", why="fixed", elapsed_s=1.0, trials=[],
    )  # fmt: skip


def _report(cand: list[float], inc: list[float] | None, tokens: tuple[list[float], list[float]] | None = None,
            ceiling: bool = False) -> CapacityReport:  # fmt: skip
    ct, it = tokens or ([100.0] * len(cand), [100.0] * len(inc or []))
    incumbent = None
    if inc is not None:
        incumbent = CapacityMeasurement(
            label="incumbent", sweeps=[_sweep("incumbent", g, t, ceiling=ceiling) for g, t in zip(inc, it, strict=True)]
        )
    return CapacityReport(
        slo=SLO,
        sweep=SETTINGS,
        candidate=CapacityMeasurement(
            label="candidate",
            sweeps=[_sweep("candidate", g, t, ceiling=ceiling) for g, t in zip(cand, ct, strict=True)],
        ),
        incumbent=incumbent,
    )


def test_a_drop_beyond_the_allowance_but_within_noise_passes_and_beyond_noise_fails() -> None:
    policy = CapacityPolicy(max_regression=0.1, stderr_k=2.0)
    noisy = capacity_gate(_report([8, 12, 5], [10, 14, 9]), policy)  # medians 8 vs 10: 20 % down, spread ~2.4
    assert noisy.passed and "not a measurable regression" in _row(noisy, "goodput vs incumbent")[1]
    steady = capacity_gate(_report([8, 8, 8.1], [10, 10, 10.1]), policy)  # the same medians, no spread
    verdict, why = _row(steady, "goodput vs incumbent")
    assert verdict == "fail" and "candidate 8 req/s vs incumbent 10 req/s: 20% below" in why
    within = capacity_gate(_report([9.5, 9.5, 9.5], [10, 10, 10]), policy)
    assert within.passed and "within the allowed 10%" in _row(within, "goodput vs incumbent")[1]


def test_fewer_than_three_repetitions_or_a_ceiling_cannot_pass() -> None:
    policy = CapacityPolicy()
    few = capacity_gate(_report([10, 10], [10, 10]), policy)
    assert few.verdict == "inconclusive" and "at least 3 repetitions" in _row(few, "goodput vs incumbent")[1]
    # both at the ceiling: no regression up to it; only the incumbent there and the candidate a little below:
    # the true drop is unknown
    assert capacity_gate(_report([400] * 3, [400] * 3, ceiling=True), policy).passed
    report = _report([380] * 3, [400] * 3)
    assert report.incumbent is not None
    report.incumbent.sweeps[:] = [s.model_copy(update={"at_ceiling": True}) for s in report.incumbent.sweeps]
    verdict, why = _row(capacity_gate(report, policy), "goodput vs incumbent")
    assert verdict == "inconclusive" and "raise sweep.max_rps" in why


def test_a_first_promotion_is_judged_on_the_slo_alone() -> None:
    result = capacity_gate(_report([10, 11, 12], None), CapacityPolicy())
    assert result.passed and "no incumbent" in _row(result, "goodput vs incumbent")[1]


POLICY_PLAN = CapacityPolicy(peak_rps=100, gpu_hour_cost=2.5, max_replicas=20, write_replicas=True)


def test_plan_arithmetic_on_fixed_inputs() -> None:
    report = _report([10, 12, 11], [5, 5, 6], tokens=([300, 320, 310], [150, 150, 160]))
    plan = capacity_plan(report, POLICY_PLAN, gpus_per_replica=2)
    c, i = plan.candidate, plan.incumbent
    assert i is not None
    assert (c.goodput_rps, c.output_tokens_per_s, c.replicas, c.gpus) == (11, 310, 10, 20)  # ceil(100 / 11) = 10
    assert c.cost_per_month == 36500.0  # 20 GPUs x 2.5 x 730 h
    assert c.cost_per_million_tokens == 4.4803  # 2 x 2.5 / (310 tok/s x 3600 s) x 1e6
    assert (i.goodput_rps, i.replicas, i.gpus, i.cost_per_month, i.cost_per_million_tokens) == (
        5,
        20,
        40,
        73000.0,
        9.2593,
    )
    assert c.fits and i.fits and plan.saving_per_month == 36500.0
    md = plan.markdown()
    assert "| replicas at 100 req/s (max 20) | 10 | 20 |" in md and "| cost per month | 36,500.00 | 73,000.00 |" in md
    assert "the candidate saves 36,500.00 per month" in md
    assert plan.table().row_count == 6
    # an exact fit needs no extra replica
    exact = capacity_plan(_report([10, 10, 10], None), POLICY_PLAN, gpus_per_replica=1)
    assert exact.candidate.replicas == 10 and exact.incumbent is None


def test_the_replicas_go_into_the_values_or_keda_bounds_when_asked() -> None:
    plan = capacity_plan(_report([10, 12, 11], None), POLICY_PLAN, gpus_per_replica=1)
    assert replica_changes(plan, POLICY_PLAN, "replicas: 2\n") == {"replicas": 10}
    keda = "autoscaling:\n  enabled: true\n  minReplicas: 12\n  maxReplicas: 30\n"
    assert replica_changes(plan, POLICY_PLAN, keda) == {"autoscaling.maxReplicas": 10, "autoscaling.minReplicas": 10}
    off = POLICY_PLAN.model_copy(update={"write_replicas": False})
    assert replica_changes(plan, off, "replicas: 2\n") == {}
    small = POLICY_PLAN.model_copy(update={"max_replicas": 5})
    over = capacity_plan(_report([10, 12, 11], None), small, gpus_per_replica=1)
    with pytest.raises(TerminalError, match=r"needs 10 replicas at peak, more than capacity.max_replicas 5"):
        replica_changes(over, small, "replicas: 2\n")
    verdict, why = _row(capacity_gate(_report([10, 12, 11], None), small), "replicas at peak")
    assert verdict == "fail" and "10 replicas of 11 req/s serve the peak 100 req/s" in why
    assert scale_changes("autoscaling:\n  enabled: true\n", 1) == {
        "autoscaling.maxReplicas": 1,
        "autoscaling.minReplicas": 1,  # the chart's default minimum (2) would exceed it
    }


@pytest.mark.parametrize("keda", [False, True])
def test_the_replicas_written_into_prod_values_keep_the_chart_schema(keda: bool) -> None:
    text = (ROOT / "gitops" / "envs" / "prod" / "values.yaml").read_text(encoding="utf-8")
    if keda:
        text = text.replace("  enabled: false    # set true", "  enabled: true    # set true")
    plan = capacity_plan(_report([10, 12, 11], None), POLICY_PLAN, gpus_per_replica=1)
    after = edit_values(text, replica_changes(plan, POLICY_PLAN, text))
    merged = check_values(after, ROOT / "gitops" / "charts" / "llm-inference", "envs/prod/values.yaml")
    if keda:
        assert merged["autoscaling"] == {**merged["autoscaling"], "minReplicas": 4, "maxReplicas": 10}
        assert merged["replicas"] == 4  # the Rollout's own count is KEDA's then: left alone
    else:
        assert merged["replicas"] == 10 and merged["autoscaling"]["maxReplicas"] == 12
    changed = [line for line in after.splitlines() if line not in text.splitlines()]
    assert len(changed) == 1  # one line edited, every other byte kept


MINIMAL = """\
version: 1
gitops:
  url: ./gitops.git
environments:
  prod:
    values_file: envs/prod/values.yaml
    cache:
      root: ./cache
    gates:
"""
LOAD = "      load:\n        profile: {rate: 5}\n        slo: {latency_ms: {ttft_p95: 300}}\n"


def test_capacity_config_validates_and_refuses_bad_keys(tmp_path: Path) -> None:
    good = (
        MINIMAL
        + LOAD
        + "      capacity:\n        peak_rps: 40\n        gpu_hour_cost: 2.1\n        write_replicas: true\n"
    )
    good += "        sweep: {start_rps: 2, repetitions: 4, budget_s: 120}\n"
    cap = parse_config(good, base_dir=tmp_path).environment("prod").gates.capacity
    assert cap is not None and cap.sweep.repetitions == 4 and cap.max_regression == 0.1
    bad = {
        "capacity:\n        peak_rps: 40\n        colour: red\n": "capacity.colour: is not a known key",
        "capacity:\n        write_replicas: true\n": "write_replicas needs peak_rps",
        "capacity:\n        sweep: {repetitions: 2}\n": "sweep.repetitions: Input should be greater than or equal to 3",
        "capacity:\n        sweep: {start_rps: 10, max_rps: 5}\n": "max_rps 5 is below start_rps 10",
    }
    for text, expected in bad.items():
        with pytest.raises(ConfigError) as info:
            parse_config(MINIMAL + LOAD + "      " + text, base_dir=tmp_path)
        assert any(expected in p for p in info.value.problems), info.value.problems
    with pytest.raises(ConfigError) as info:
        parse_config(MINIMAL + "      capacity: {peak_rps: 40}\n", base_dir=tmp_path)
    assert any("capacity needs load" in p for p in info.value.problems)
