"""The eval gate as a pure function, with crafted reports: regression limits, the stderr rule, floors, defaults."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.config import EvalPolicy
from pipeline.evaluate import EvalReport, MetricPolicy, MetricValue, Suite, eval_gate
from pipeline.evaluate.gate import allowed_regression, combined_stderr, judge_metric
from pipeline.evaluate.suite import parse_suite

SUITE_YAML = """
tasks:
  mmlu:
    metrics:
      "acc,none": {max_regression_abs: 0.03}
  gsm8k:
    metrics:
      "exact_match,strict-match": {max_regression_abs: 0.02, stderr_k: 2.0}
"""


def _report(values: dict[tuple[str, str], tuple[float, float | None]], suite_sha: str = "s") -> EvalReport:
    tasks: dict[str, dict[str, MetricValue]] = {}
    for (task, metric), (value, stderr) in values.items():
        tasks.setdefault(task, {})[metric] = MetricValue(value=value, stderr=stderr, n=1000)
    return EvalReport(suite="t", suite_sha256=suite_sha, subject="x", backend="hf", lm_eval_version="0", tasks=tasks)


@pytest.fixture
def suite(tmp_path: Path) -> Suite:
    return parse_suite(SUITE_YAML, tmp_path / "t.yaml")


MMLU = ("mmlu", "acc,none")
GSM = ("gsm8k", "exact_match,strict-match")


def test_mmlu_may_not_fall_more_than_three_points_below_the_baseline(suite: Suite) -> None:
    baseline = _report({MMLU: (0.700, 0.004), GSM: (0.50, 0.01)})
    within = eval_gate(_report({MMLU: (0.671, 0.004), GSM: (0.50, 0.01)}), baseline, suite)
    assert within.passed and "within the allowed 0.03" in within.rows[0].why
    beyond = eval_gate(_report({MMLU: (0.669, 0.004), GSM: (0.50, 0.01)}), baseline, suite)
    assert not beyond.passed and beyond.verdict == "fail"
    assert [row.name for row in beyond.failures] == ["mmlu acc,none"]
    assert "0.031 below the baseline 0.7" in beyond.failures[0].why and "do not promote" in beyond.failures[0].why
    assert "mmlu acc,none" in beyond.summary()


def test_a_drop_within_k_combined_stderr_does_not_count(suite: Suite) -> None:
    # allowed 0.02; combined stderr = hypot(0.02, 0.02) = 0.0283; 2 sigma = 0.0566
    baseline = _report({MMLU: (0.7, None), GSM: (0.50, 0.02)})
    noisy = eval_gate(_report({MMLU: (0.7, None), GSM: (0.45, 0.02)}), baseline, suite)
    assert noisy.passed
    assert "within 2×σ = 0.05657" in noisy.rows[1].why and "evaluate more samples" in noisy.rows[1].why
    real = eval_gate(_report({MMLU: (0.7, None), GSM: (0.44, 0.02)}), baseline, suite)
    assert not real.passed and "beyond 2×σ = 0.05657" in real.failures[0].why


def test_without_stderr_rule_the_same_noisy_drop_fails(tmp_path: Path) -> None:
    strict = parse_suite(SUITE_YAML.replace(", stderr_k: 2.0", ""), tmp_path / "t.yaml")
    baseline = _report({MMLU: (0.7, None), GSM: (0.50, 0.02)})
    assert not eval_gate(_report({MMLU: (0.7, None), GSM: (0.45, 0.02)}), baseline, strict).passed


def test_stderr_rule_with_no_stderr_reported_takes_the_drop_as_is(suite: Suite) -> None:
    baseline = _report({MMLU: (0.7, None), GSM: (0.50, None)})
    result = eval_gate(_report({MMLU: (0.7, None), GSM: (0.47, None)}), baseline, suite)
    assert not result.passed and "no stderr reported" in result.failures[0].why


def test_an_improvement_passes_and_says_so(suite: Suite) -> None:
    baseline = _report({MMLU: (0.6, 0.01), GSM: (0.4, 0.01)})
    result = eval_gate(_report({MMLU: (0.65, 0.01), GSM: (0.4, 0.01)}), baseline, suite)
    assert result.passed and "above the baseline" in result.rows[0].why and "no regression" in result.rows[1].why
    assert result.rows[0].baseline == 0.6 and result.rows[0].stderr == 0.01


def test_an_equal_score_says_it_equals_the_baseline_never_minus_zero(suite: Suite) -> None:
    baseline = _report({MMLU: (0.6, 0.01), GSM: (0.4, 0.01)})
    result = eval_gate(_report({MMLU: (0.6, 0.01), GSM: (0.4, 0.01)}), baseline, suite)
    assert result.passed
    assert all("equals the baseline" in row.why and "-0" not in row.why for row in result.rows)


def test_relative_and_absolute_allowances_take_the_smaller() -> None:
    both = MetricPolicy(max_regression_abs=0.05, max_regression_rel=0.02)
    assert allowed_regression(both, 0.5) == pytest.approx(0.01)
    assert allowed_regression(MetricPolicy(max_regression_abs=0.05), 0.5) == 0.05
    assert allowed_regression(MetricPolicy(floor=0.1), 0.5) is None


def test_combined_stderr_treats_one_missing_side_as_zero() -> None:
    assert combined_stderr(MetricValue(value=1, stderr=0.3), MetricValue(value=1, stderr=0.4)) == pytest.approx(0.5)
    assert combined_stderr(MetricValue(value=1, stderr=0.3), MetricValue(value=1)) == pytest.approx(0.3)
    assert combined_stderr(MetricValue(value=1), MetricValue(value=1)) is None


def test_without_a_baseline_the_floor_is_the_rule(tmp_path: Path) -> None:
    floors = parse_suite(SUITE_YAML.replace("{max_regression_abs: 0.03}", "{floor: 0.6}"), tmp_path / "t.yaml")
    ok = eval_gate(_report({MMLU: (0.61, 0.01), GSM: (0.4, 0.01)}), None, floors)
    assert ok.rows[0].verdict == "pass" and "no baseline: judged by the floor alone" in ok.rows[0].why
    # gsm8k has no floor and there is no baseline: nothing to judge by, so the gate cannot pass
    assert ok.rows[1].verdict == "inconclusive" and "pass --baseline" in ok.rows[1].why
    assert not ok.passed and ok.verdict == "inconclusive"
    low = eval_gate(_report({MMLU: (0.55, 0.01), GSM: (0.4, 0.01)}), None, floors)
    assert low.rows[0].verdict == "fail" and "below the floor 0.6 by 0.05" in low.rows[0].why


def test_the_floor_applies_even_when_the_baseline_allows_the_drop() -> None:
    policy = MetricPolicy(max_regression_abs=0.5, floor=0.8)
    row = judge_metric("t m", policy, MetricValue(value=0.7), MetricValue(value=0.9))
    assert row.verdict == "fail" and "below the floor 0.8" in row.why and "baseline 0.9" in row.why


def test_a_metric_missing_from_the_candidate_fails_with_a_fix(suite: Suite) -> None:
    result = eval_gate(_report({MMLU: (0.7, 0.01)}), _report({MMLU: (0.7, 0.01), GSM: (0.5, 0.01)}), suite)
    row = result.failures[0]
    assert row.name == "gsm8k exact_match,strict-match" and row.value is None
    assert "not measured" in row.why and "metric key" in row.why


def test_lower_is_better_metrics_regress_upwards() -> None:
    policy = MetricPolicy(max_regression_abs=1.0, higher_is_better=False)
    assert judge_metric("ppl", policy, MetricValue(value=10.5), MetricValue(value=10.0)).verdict == "pass"
    worse = judge_metric("ppl", policy, MetricValue(value=11.5), MetricValue(value=10.0))
    assert worse.verdict == "fail" and "1.5 above the baseline 10" in worse.why


def test_environment_defaults_fill_what_the_suite_leaves_unset(tmp_path: Path) -> None:
    bare = parse_suite('tasks:\n  mmlu:\n    metrics:\n      "acc,none": {}\n', tmp_path / "b.yaml")
    baseline, candidate = _report({MMLU: (0.70, 0.01)}), _report({MMLU: (0.66, 0.01)})
    assert eval_gate(candidate, baseline, bare).verdict == "inconclusive"  # no rule at all
    assert not eval_gate(candidate, baseline, bare, EvalPolicy(max_regression_abs=0.03)).passed
    assert eval_gate(candidate, baseline, bare, EvalPolicy(max_regression_abs=0.05)).passed


def test_a_baseline_from_another_suite_version_is_flagged(suite: Suite) -> None:
    result = eval_gate(_report({MMLU: (0.7, 0.01), GSM: (0.5, 0.01)}), _report({MMLU: (0.7, 0.01)}, "old"), suite)
    assert all("different version of the suite" in row.why for row in result.rows)


def test_the_gate_renders_as_markdown_for_records_and_artifacts(suite: Suite) -> None:
    baseline = _report({MMLU: (0.70, 0.004), GSM: (0.50, 0.01)})
    text = eval_gate(_report({MMLU: (0.60, 0.004), GSM: (0.50, 0.01)}), baseline, suite).markdown()
    assert text.startswith("**eval gate: FAIL**")
    assert "| mmlu acc,none | 0.6 ± 0.004 | 0.7 | ≤ 0.03 below baseline | fail |" in text
