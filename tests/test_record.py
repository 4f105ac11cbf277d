"""PromotionRecord: ids that sort by time, JSON that round-trips without secrets, markdown a person can read."""

from __future__ import annotations

import re

import pytest

from pipeline.errors import TerminalError
from pipeline.gates import GateResult, GateRow
from pipeline.record import PROMOTION_ID_PATTERN, PromotionRecord, new_promotion_id, promotion_id_time


def test_promotion_ids_are_short_unique_and_sort_in_time_order() -> None:
    start = 1_795_000_000_000
    ids = [new_promotion_id(start + ms) for ms in range(0, 5000, 7)]
    assert ids == sorted(ids)
    same_ms = {new_promotion_id(start) for _ in range(2000)}
    assert len(same_ms) == 2000  # 30 random bits within one millisecond
    assert all(len(i) == 16 and re.fullmatch(PROMOTION_ID_PATTERN, i) for i in ids)
    assert promotion_id_time(ids[3]).timestamp() == pytest.approx((start + 21) / 1000)


def gate() -> GateResult:
    row = GateRow(name="fact_recall", value=0.97, baseline=0.99, limit=">= 0.94", verdict="pass", why="within 0.05")
    return GateResult(gate="eval", rows=[row])


def test_json_round_trips_and_hides_tokens(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_TOKEN", "hf_abcdefghijklmnopqrstuv")
    record = PromotionRecord(
        id=new_promotion_id(),
        env="prod",
        decision="promoted",
        model={"repo": "org/name", "sha": "a" * 40},
        artifact={"id": "art-1", "format": "awq-w4a16"},
        eval_gate=gate(),
        reason="pulled with https://user:hf_abcdefghijklmnopqrstuv@huggingface.co",
        timings={"quantize": 31.5, "evaluate": 12.0},
    )
    text = record.to_json()
    assert "hf_abcdefghijklmnopqrstuv" not in text
    back = PromotionRecord.from_json(text)
    assert back.eval_gate == record.eval_gate and back.artifact == record.artifact and back.id == record.id


def test_markdown_shows_the_decision_the_model_and_each_gate_row() -> None:
    record = PromotionRecord(
        id=new_promotion_id(),
        env="staging",
        decision="rejected",
        reason="eval gate failed",
        model={"repo": "org/name", "sha": "b" * 40},
        eval_gate=gate(),
        timings={"evaluate": 12.04},
    )
    text = record.markdown()
    assert f"## Promotion {record.id} to staging: rejected" in text
    assert "| model | org/name@bbbbbbbbbbbb |" in text
    assert "**Why:** eval gate failed" in text
    assert "| fact_recall | 0.97 | 0.99 | >= 0.94 | pass | within 0.05 |" in text
    assert "| evaluate | 12.0 |" in text


def test_a_damaged_record_is_a_terminal_error_naming_the_file_and_key() -> None:
    with pytest.raises(TerminalError, match=r"records/prod/x.json is not a valid PromotionRecord: id"):
        PromotionRecord.from_json('{"id": "NOT-AN-ID", "env": "prod"}', where="records/prod/x.json")
