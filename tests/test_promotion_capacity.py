"""The capacity gate in a promotion (pipeline.promotion, without Prefect): a candidate that serves less traffic per
replica than the live incumbent is rejected with both goodputs named and nothing committed; a passing one carries
the capacity plan in its record and writes its replicas into the values.

The small model is really quantized, published, preloaded and verified; the servers the load and capacity steps
drive are the fake streaming servers of tests/loadservers.py, put in through the promotion's hooks (one slot for
the slow server, four for the fast one, each busy 50 ms per request). The GitOps repo is a real bare repository.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from loadservers import MODEL, Behaviour, running

from pipeline import promotion
from pipeline.cache import MARKER
from pipeline.config import Environment, load_config
from pipeline.errors import TerminalError
from pipeline.gitops import GitOps, Promotion, init_repo
from pipeline.loadtest import Target, run_load, synthetic_prompts
from pipeline.record import PromotionRecord
from pipeline.serve import Engine
from pipeline.steps import CapacityRequest, LoadTestRequest, StepResult
from pipeline.steps import capacity as capacity_step
from pipeline.steps.base import timed

CONFIG = """\
version: 1
gitops: {{url: ./remote.git}}
artifacts: {{store: local, path: ./artifact-store}}
model:
  served_name: tiny-llama
  quantization:
    method: gptq
    calibration: {{samples: 16, max_seq_len: 64}}
environments:
  local:
    values_file: envs/local/values.yaml
    cache: {{root: {cache}}}
    gpu_pool: {{gpus_per_replica: 1}}
    gates:
      load:
        profile: {{rate: 10, duration_s: 0.5, warmup_s: 0.1, max_tokens: 4, prompt_tokens: 16}}
        slo: {{latency_ms: {{e2e_p50: 250}}, min_requests: 3, min_rate_ratio: 0.8}}
      capacity:
        peak_rps: 100
        gpu_hour_cost: 2.5
        max_replicas: 20
        max_regression: 0.2
        write_replicas: true
        sweep: {{start_rps: 10, growth: 3, max_rps: 150, resolution: 0.5, duration_s: 0.5, warmup_s: 0.1,
                 budget_s: 60, repetitions: 3}}
"""
SLOW = Behaviour(tokens=4, slots=1, service_time=0.05)  # at most 20 req/s
FAST = Behaviour(tokens=4, slots=4, service_time=0.05)  # at most 80 req/s
LIVE = "live-artifact-0001"  # the incumbent's artifact id, committed and preloaded by the test


@dataclass
class FakeServer:
    url: str
    model: str = MODEL
    served_by: str = "fake 1.0"

    def check_alive(self) -> None:
        """The fake server lives as long as its block."""


class FakeServing(promotion.Hooks):
    """Hooks that serve the load and capacity steps with fake servers: the candidate (the promoted artifact's
    directory) behaves as ``candidate``, the incumbent's directory as ``incumbent``. Other steps run for real."""

    def __init__(self, candidate: Behaviour, incumbent: Behaviour) -> None:
        self.behaviours = {"candidate": candidate, "incumbent": incumbent}
        self.capacity: list[CapacityRequest] = []
        self.reported: list[PromotionRecord] = []

    def report(self, record: PromotionRecord, env: Environment) -> None:
        self.reported.append(record)

    @contextmanager
    def _serve(self, model_dir: str, engine: Engine, values: dict[str, Any] | None) -> Iterator[FakeServer]:
        side = "incumbent" if Path(model_dir).name == LIVE else "candidate"
        with running(self.behaviours[side]) as server:
            yield FakeServer(server.url)

    def serve(self, model_dir: str, engine: Engine, values: dict[str, Any] | None) -> AbstractContextManager[Any]:
        return self._serve(model_dir, engine, values)

    def step(self, request: Any, run: promotion.Execute) -> StepResult[Any]:
        if isinstance(request, LoadTestRequest):
            with running(self.behaviours["candidate"]) as server:
                prompts = synthetic_prompts(request.gate.profile.prompt_tokens)
                return timed(
                    "loadtest", lambda: (run_load(Target(server.url, MODEL), request.gate.profile, prompts), False)
                )
        if isinstance(request, CapacityRequest):
            self.capacity.append(request)
            return timed("capacity", lambda: capacity_step.run(request, serve=self.serve))
        return run(request)


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture
def site(tmp_path: Path, shared_cache: Path) -> Path:
    init_repo(tmp_path / "remote.git")
    (tmp_path / "promotion.yaml").write_text(CONFIG.format(cache=shared_cache))
    return tmp_path


def git_show(site: Path, path: str) -> str:
    shown = subprocess.run(
        ["git", "--git-dir", str(site / "remote.git"), "show", f"main:{path}"], capture_output=True, text=True
    )
    return shown.stdout if shown.returncode == 0 else ""


def commits(site: Path) -> list[str]:
    log = subprocess.run(
        ["git", "--git-dir", str(site / "remote.git"), "log", "--format=%H", "main"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return log.stdout.split()


def live_incumbent(site: Path, cache: Path) -> None:
    """An incumbent runs in the environment: its promotion committed, its artifact preloaded in the cache."""
    cfg = load_config(site / "promotion.yaml")
    gitops = GitOps.from_settings(cfg.gitops, site / "seed")
    live = Promotion(env="local", model="org/live", revision="a" * 40, artifact=LIVE, format="w4a16")
    gitops.promote(live, "envs/local/values.yaml")
    (cache / LIVE).mkdir(exist_ok=True)
    (cache / LIVE / MARKER).write_text(json.dumps({"manifest_sha256": "seeded"}))


@pytest.mark.slow
def test_a_candidate_slower_than_the_incumbent_is_rejected_naming_both_goodputs(
    tiny_model: Path, site: Path, shared_cache: Path
) -> None:
    live_incumbent(site, shared_cache)
    before = commits(site)
    hooks = FakeServing(candidate=SLOW, incumbent=FAST)
    cfg = load_config(site / "promotion.yaml")
    with pytest.raises(TerminalError) as info:
        promotion.promote(cfg, "local", str(tiny_model), workdir=site / "work", hooks=hooks)
    message = str(info.value)
    assert "nothing was committed" in message and "capacity gate fail" in message and "do not promote" in message
    assert [r.incumbent_dir for r in hooks.capacity] == [str(shared_cache / LIVE)], "the live artifact, preloaded"
    rejected = hooks.reported[-1]
    assert rejected.decision == "rejected" and rejected.capacity_report is not None
    assert rejected.capacity_report.incumbent is not None
    cand = rejected.capacity_report.candidate.median_goodput
    inc = rejected.capacity_report.incumbent.median_goodput
    assert cand is not None and inc is not None and cand < inc  # the 20 req/s server below the 80 req/s one
    assert f"candidate {cand:.4g} req/s vs incumbent {inc:.4g} req/s" in message, "both goodputs named"
    assert rejected.capacity_plan is not None and rejected.capacity_plan.incumbent is not None
    assert commits(site) == before, "nothing was committed"
    assert yaml.safe_load(git_show(site, "envs/local/values.yaml"))["model"]["artifact"] == LIVE


@pytest.mark.slow
def test_a_promoted_record_carries_the_capacity_plan_and_its_replicas_reach_the_values(
    tiny_model: Path, site: Path
) -> None:
    hooks = FakeServing(candidate=FAST, incumbent=SLOW)
    cfg = load_config(site / "promotion.yaml")
    record = promotion.promote(cfg, "local", str(tiny_model), workdir=site / "work", hooks=hooks)
    assert record.decision == "promoted"
    assert hooks.capacity[0].incumbent_dir is None, "a first promotion: no incumbent to measure"
    assert record.capacity_gate is not None and record.capacity_gate.passed
    plan = record.capacity_plan
    assert plan is not None and plan.incumbent is None and plan.candidate.goodput_rps
    replicas = plan.candidate.replicas
    assert replicas is not None and replicas >= 2, "100 req/s at peak need more than one 80 req/s replica"
    assert plan.candidate.cost_per_month == pytest.approx(replicas * 2.5 * 730)
    assert "**capacity plan**" in record.markdown() and "capacity gate" in record.markdown()
    stored = GitOps.open(str(site / "remote.git"), site / "look").record("local", record.id)
    assert stored.capacity_plan == plan and stored.capacity_report is not None
    assert yaml.safe_load(git_show(site, "envs/local/values.yaml"))["replicas"] == replicas
