"""GateResult: the verdict of a gate (quality, latency, canary check), with every row explained.

Gates are pure functions of (evidence, policy) -> GateResult. A result lists every row it judged, not only
the failures, so a person can see how close each metric came, and it renders itself as a table for the CLI
and as markdown for records and Prefect artifacts.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict

Verdict = Literal["pass", "fail", "inconclusive"]


class GateRow(BaseModel):
    """One judged metric: what was measured, against what, and why it passed or failed."""

    model_config = ConfigDict(frozen=True)

    name: str
    value: float | None
    limit: str
    verdict: Verdict
    why: str
    baseline: float | None = None
    stderr: float | None = None

    @property
    def passed(self) -> bool:
        return self.verdict == "pass"


class GateResult(BaseModel):
    """The verdict of one gate. It passes only when every row passes."""

    model_config = ConfigDict(frozen=True)

    gate: str
    rows: list[GateRow]

    @property
    def passed(self) -> bool:
        return bool(self.rows) and all(row.passed for row in self.rows)

    @property
    def verdict(self) -> Verdict:
        if self.passed:
            return "pass"
        if any(row.verdict == "fail" for row in self.rows):
            return "fail"
        return "inconclusive"

    @property
    def failures(self) -> list[GateRow]:
        return [row for row in self.rows if not row.passed]

    def summary(self) -> str:
        """One line: the verdict and, when it did not pass, the rows that stopped it."""
        if self.passed:
            return f"{self.gate} gate passed ({len(self.rows)} checks)"
        if not self.rows:
            return f"{self.gate} gate inconclusive: nothing was measured"
        reasons = "; ".join(f"{row.name}: {row.why}" for row in self.failures)
        return f"{self.gate} gate {self.verdict}: {reasons}"

    def markdown(self) -> str:
        """A markdown table of every row (for records, PR bodies and Prefect artifacts)."""
        lines = [
            f"**{self.gate} gate: {self.verdict.upper()}**",
            "",
            "| check | value | baseline | limit | verdict | why |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        for row in self.rows:
            value = "-" if row.value is None else f"{row.value:.4g}"
            if row.stderr is not None and row.value is not None:
                value += f" ± {row.stderr:.2g}"
            baseline = "-" if row.baseline is None else f"{row.baseline:.4g}"
            lines.append(f"| {row.name} | {value} | {baseline} | {row.limit} | {row.verdict} | {row.why} |")
        return "\n".join(lines) + "\n"
