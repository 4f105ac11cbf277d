"""The gates of a promotion (pipeline.gating) when the verify step already ran the eval suite on its vLLM server:
judge takes that report (no second evaluation, no second server), refuses a damaged candidate on it with the gate
that failed, and keeps the report once. The engine is stood in for (canned verify results around real lm-eval
reports of the small model and of a damaged copy); the served path itself is tested in test_vllm_serving.py and,
on a cluster, in test_sandbox_e2e.py."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from pipeline import gating, promotion, tinymodel
from pipeline.config import load_config
from pipeline.evaluate import EvalReport, LocalWeights, evaluate, load_suite
from pipeline.gitops import GitOps, init_repo
from pipeline.record import PromotionRecord, new_promotion_id
from pipeline.steps import AnyRequest, StepResult
from pipeline.verify import VerifyResult

CONFIG = """\
version: 1
gitops: {{url: {remote}}}
model: {{served_name: tiny-llama}}
environments:
  local:
    values_file: envs/local/values.yaml
    cache: {{root: {cache}}}
    gpu_pool: {{gpus_per_replica: 0}}
    gates:
      eval: {{suite: smoke}}
"""


@pytest.fixture(scope="module")
def reports(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, EvalReport]:
    """Real in-process lm-eval reports: the small model, and a copy damaged with noise."""
    where = tmp_path_factory.mktemp("gating")
    damaged = tinymodel.damage(tiny_model, where / "damaged")
    smoke = load_suite("smoke")
    return {
        "good": evaluate(LocalWeights(tiny_model), smoke, cache_dir=where / "cache"),
        "damaged": evaluate(LocalWeights(damaged), smoke, cache_dir=where / "cache"),
    }


class Canned(promotion.Hooks):
    """Hooks that answer the verify step as vLLM would have (with the eval report it ran), and note every step."""

    def __init__(self, verified: VerifyResult) -> None:
        self.verified, self.asked = verified, list[str]()

    def step(self, request: AnyRequest, run: Any) -> StepResult[Any]:
        self.asked.append(request.step)
        if request.step != "verify":
            raise AssertionError(f"no {request.step} step expected: the verify step's report serves the gate")
        assert request.evaluate is not None and request.evaluate.suite == "smoke", "the eval suite is asked of it"
        return StepResult[VerifyResult](
            step="verify", status="succeeded", started_at=datetime.now(UTC), seconds=1.0, output=self.verified
        )


def run_with(tmp_path: Path, report: EvalReport) -> tuple[promotion.Run, Canned]:
    init_repo(tmp_path / "remote.git")
    path = tmp_path / "promotion.yaml"
    path.write_text(CONFIG.format(remote=tmp_path / "remote.git", cache=tmp_path / "volume"))
    cfg = load_config(path)
    verified = VerifyResult(
        digest="sha256:" + "0" * 64, passed=True, served_by="vllm 0.32.0", args_sha256="", completion=" Paris",
        prompt_logprobs=4, verified_at=datetime.now(UTC).isoformat(), eval_report=report,
    )  # fmt: skip
    hooks = Canned(verified)
    record = PromotionRecord(id=new_promotion_id(), env="local")
    gitops = GitOps.from_settings(cfg.gitops, tmp_path / "work")
    return promotion.Run(cfg, "local", gitops, hooks, record), hooks


def test_the_verify_steps_report_passes_the_gate_without_a_second_evaluation(
    tmp_path: Path, reports: dict[str, EvalReport]
) -> None:
    run, hooks = run_with(tmp_path, reports["good"])
    gating.verify(run, str(tmp_path / "artifact"), "unquantized-0123456789abcdef")
    (result,) = gating.judge(run, str(tmp_path / "artifact"))
    assert result.passed, result.summary()
    assert hooks.asked == ["verify"]
    assert run.record.eval_report == reports["good"] and run.record.eval_gate == result
    assert run.record.verify is not None and run.record.verify.eval_report is None, "kept once, as eval_report"


def test_a_damaged_candidates_report_from_the_verify_step_fails_the_gate_by_name(
    tmp_path: Path, reports: dict[str, EvalReport]
) -> None:
    run, hooks = run_with(tmp_path, reports["damaged"])
    gating.verify(run, str(tmp_path / "artifact"), "unquantized-0123456789abcdef")
    (result,) = gating.judge(run, str(tmp_path / "artifact"))
    assert not result.passed and hooks.asked == ["verify"]
    assert "facts_mc" in result.summary() and "below the floor" in result.summary()
