"""GateResult: passes only when every row passes, and explains itself."""

from __future__ import annotations

from pipeline.gates import GateResult, GateRow


def row(name: str, verdict: str, why: str = "ok") -> GateRow:
    return GateRow(name=name, value=0.5, limit="<= 1", verdict=verdict, why=why)  # type: ignore[arg-type]


def test_all_rows_pass() -> None:
    result = GateResult(gate="load", rows=[row("ttft_p95", "pass"), row("error_rate", "pass")])
    assert result.passed and result.verdict == "pass"
    assert result.summary() == "load gate passed (2 checks)"


def test_one_failure_fails_and_is_named() -> None:
    result = GateResult(gate="eval", rows=[row("acc", "pass"), row("exact_match", "fail", "dropped 0.2 > 0.05")])
    assert not result.passed and result.verdict == "fail"
    assert result.summary() == "eval gate fail: exact_match: dropped 0.2 > 0.05"
    assert "| exact_match | 0.5 | - | <= 1 | fail | dropped 0.2 > 0.05 |" in result.markdown()


def test_inconclusive_and_empty_never_pass() -> None:
    assert GateResult(gate="load", rows=[row("ttft_p95", "inconclusive", "3 requests")]).verdict == "inconclusive"
    empty = GateResult(gate="load", rows=[])
    assert not empty.passed and "nothing was measured" in empty.summary()
