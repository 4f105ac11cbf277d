"""The Prefect flows end to end on this machine (the local environment): promote, refuse, roll back, one at a time.

These run the real flows against Prefect's test server: real quantization of the small model, the real eval
gate, the real load-test gate against a real local server, and real commits to a real (bare) GitOps repo.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline import tinymodel
from pipeline.errors import TerminalError
from pipeline.gitops import GitOps, init_repo

ROOT = Path(__file__).resolve().parent.parent

CONFIG = """\
version: 1
gitops: {{url: ./remote.git}}
model:
  served_name: tiny-llama
  quantization:
    method: gptq
    calibration: {{samples: 16, max_seq_len: 64}}
environments:
  local:
    values_file: envs/local/values.yaml
    cache: {{root: {cache}}}
    gpu_pool: {{gpus_per_replica: 0}}
    approval: {{required: {approval}}}
    gates:
{gates}
"""
EVAL_ONLY = "      eval: {suite: smoke}\n"
BOTH = EVAL_ONLY + (
    "      load:\n"
    "        profile: {concurrency: 2, duration_s: 8, warmup_s: 1, prompt_tokens: 16, max_tokens: 8}\n"
    "        slo: {latency_ms: {ttft_p95: 5000, e2e_p95: 20000}, max_error_rate: 0.01, min_requests: 5}\n"
)


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One cache volume for the module's promotions: each recipe is quantized once, then found by its id."""
    return tmp_path_factory.mktemp("cache")


def write_config(site: Path, gates: str = EVAL_ONLY, approval: bool = False) -> str:
    """promotion.yaml in ``site``, its cache root being the one ``site/cache-root`` names."""
    path = site / "promotion.yaml"
    cache = (site / "cache-root").read_text()
    path.write_text(CONFIG.format(gates=gates, cache=cache, approval=str(approval).lower()))
    return str(path)


@pytest.fixture
def site(tmp_path: Path, shared_cache: Path) -> Path:
    """A promotion.yaml for the local environment, its own bare GitOps remote, and the shared cache."""
    init_repo(tmp_path / "remote.git")
    (tmp_path / "cache-root").write_text(str(shared_cache))
    write_config(tmp_path)
    return tmp_path


def history(site: Path) -> list[str]:
    entries = GitOps.open(str(site / "remote.git"), site / "look").history("local")
    return [f"{e.action}:{e.reverts if e.action == 'revert' else e.artifact}" for e in entries]


@pytest.mark.slow
@pytest.mark.prefect
def test_promote_gates_commits_and_records(prefect_harness: None, tiny_model: Path, site: Path) -> None:
    from flows.promote import promote

    write_config(site, gates=BOTH)
    record = promote(str(tiny_model), "local", config=str(site / "promotion.yaml"), workdir=str(site / "work"))
    assert record["decision"] == "promoted"
    assert record["eval_gate"]["rows"] and all(r["verdict"] == "pass" for r in record["eval_gate"]["rows"])
    assert record["load_report"]["successes"] >= 5 and record["load_gate"]["rows"]
    assert set(record["timings"]) >= {"resolve", "quantize", "publish", "preload", "evaluate", "loadtest", "commit"}
    assert record["artifact"]["manifest_digest"].startswith("sha256:"), "the record names the bytes it evaluated"
    artifact = record["artifact"]["id"]
    assert history(site) == [f"promote:{artifact}"]
    cache = Path((site / "cache-root").read_text())
    assert (cache / artifact / ".complete").is_file(), "the artifact was preloaded and verified"
    stored = GitOps.open(str(site / "remote.git"), site / "look2").record("local", record["id"])
    assert stored.decision == "promoted" and stored.eval_report is not None
    from prefect import get_client

    with get_client(sync_client=True) as client:
        keys = {a.key for a in client.read_artifacts()}
    key = f"promotion-{record['id']}"
    assert {key, f"{key}-eval-gate", f"{key}-load-gate", f"{key}-latency"} <= keys, "report, tables and plot in the UI"


@pytest.mark.slow
@pytest.mark.prefect
def test_damaged_candidate_is_refused_and_nothing_is_committed(
    prefect_harness: None, tiny_model: Path, site: Path
) -> None:
    from flows.promote import promote

    damaged = tinymodel.damage(tiny_model, site / "damaged")
    with pytest.raises(TerminalError) as info:
        promote(str(damaged), "local", config=str(site / "promotion.yaml"), workdir=str(site / "work"))
    message = str(info.value)
    assert "was rejected for local, nothing was committed" in message
    assert "facts_mc acc" in message or "facts_gen" in message, message
    assert history(site) == []


@pytest.mark.slow
@pytest.mark.prefect
def test_rollback_restores_the_previous_model(prefect_harness: None, tiny_model: Path, site: Path) -> None:
    from flows.promote import promote
    from flows.rollback import rollback

    config, work = str(site / "promotion.yaml"), str(site / "work")
    first = promote(str(tiny_model), "local", config=config, workdir=work)
    second = promote(str(tiny_model), "local", config=config, method="awq", workdir=work)
    assert first["artifact"]["id"] != second["artifact"]["id"]
    result = rollback("local", config=config, workdir=work)
    assert [r["promotion_id"] for r in result["reverted"]] == [second["id"]]
    assert history(site)[0] == f"revert:{second['id']}"
    repo = GitOps.open(str(site / "remote.git"), site / "look")
    assert repo.baseline("local").id == first["id"], "the first promotion runs again"  # type: ignore[union-attr]
    with pytest.raises(TerminalError, match="is not a live promotion"):
        rollback("local", config=config, to=second["id"], workdir=work)


@pytest.mark.prefect
def test_a_second_promotion_of_the_same_environment_is_refused(
    prefect_harness: None, tiny_model: Path, site: Path
) -> None:
    from flows.guard import environment_slot
    from flows.promote import promote

    with environment_slot("local"), pytest.raises(TerminalError, match="another promotion of local is running"):
        promote(str(tiny_model), "local", config=str(site / "promotion.yaml"), workdir=str(site / "work"))
    assert history(site) == []


@pytest.mark.prefect
def test_a_crash_after_the_commit_converges_on_rerun(
    prefect_harness: None, tiny_model: Path, site: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import flows.promote as module
    import flows.steps as hooks
    from pipeline.record import new_promotion_id

    pid = new_promotion_id()
    real_publish = hooks.publish

    def crash(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt("the process died right after its commit")

    monkeypatch.setattr(hooks, "publish", crash)
    with pytest.raises(KeyboardInterrupt):
        module.promote(
            str(tiny_model), "local", config=str(site / "promotion.yaml"), promotion_id=pid, workdir=str(site / "work")
        )
    assert len(history(site)) == 1, "the commit landed before the crash"
    monkeypatch.setattr(hooks, "publish", real_publish)
    record = module.promote(
        str(tiny_model), "local", config=str(site / "promotion.yaml"), promotion_id=pid, workdir=str(site / "work")
    )
    assert record["id"] == pid and record["decision"] == "promoted"
    assert len(history(site)) == 1, "exactly one promotion commit after the re-run"


@pytest.mark.slow
@pytest.mark.prefect
def test_approval_pauses_before_the_commit_and_resumes(prefect_harness: None, tiny_model: Path, site: Path) -> None:
    import threading
    import time

    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterState, FlowRunFilterStateType

    from flows.approve import approve
    from flows.promote import promote

    config = write_config(site, approval=True)
    outcome: dict[str, object] = {}

    def run() -> None:
        try:
            outcome["record"] = promote(str(tiny_model), "local", config=config, workdir=str(site / "work"))
        except Exception as exc:  # asserted below
            outcome["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    paused = None
    with get_client(sync_client=True) as client:
        for _ in range(600):
            runs = client.read_flow_runs(
                flow_run_filter=FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=["PAUSED"])))
            )
            if runs:
                paused = runs[0]
                break
            time.sleep(0.2)
    assert paused is not None, outcome
    assert history(site) == [], "nothing is committed while waiting for approval"
    approve(str(paused.id), approver="alice", comment="looks good")
    thread.join(timeout=120)
    assert "error" not in outcome, outcome
    assert outcome["record"]["decision"] == "promoted"  # type: ignore[index]
    assert len(history(site)) == 1


@pytest.mark.prefect
def test_watch_promotes_a_new_revision_once(prefect_harness: None, tiny_model: Path, site: Path) -> None:
    from flows.watch import watch

    config = site / "promotion.yaml"
    config.write_text(config.read_text().replace("model:\n", f"model:\n  source: {tiny_model}\n", 1))
    first = watch(config=str(config), workdir=str(site / "work"))
    assert first["promoted"] is not None and first["env"] == "local"
    again = watch(config=str(config), workdir=str(site / "work"))
    assert again["promoted"] is None, "the same revision is not promoted twice"
    assert len(history(site)) == 1


@pytest.mark.slow
@pytest.mark.prefect
def test_reevaluate_rolls_back_a_live_model_that_regressed(prefect_harness: None, tiny_model: Path, site: Path) -> None:
    from flows.promote import promote
    from flows.reevaluate import reevaluate

    (site / "cache-root").write_text(str(site / "own-cache"))  # this test damages its live weights: not shared
    config = Path(write_config(site))
    config.write_text(config.read_text() + "    reevaluate: {rollback_on_regression: true}\n")
    record = promote(str(tiny_model), "local", config=str(config), workdir=str(site / "work"))
    assert reevaluate(config=str(config), workdir=str(site / "work"))["local"]["verdict"] == "ok"
    # The live weights go bad (a broken volume, a bad manual copy): the scheduled re-evaluation must notice.
    live = site / "own-cache" / record["artifact"]["id"]
    damaged = tinymodel.damage(tiny_model, site / "damaged")
    for name in ("model.safetensors", "config.json"):
        (live / name).unlink()
        (live / name).write_bytes((damaged / name).read_bytes())
    result = reevaluate(config=str(config), workdir=str(site / "work"))["local"]
    assert result["verdict"] == "regressed" and result["action"] == "rolled back"
    assert history(site)[0] == f"revert:{record['id']}"
    from pipeline.evaluate import LocalWeights, evaluate, load_suite

    kept = evaluate(LocalWeights(live), load_suite("smoke"))  # the re-measurement did not overwrite the cache
    assert kept.skipped and kept.metric("facts_mc", "acc,none").value >= 0.9  # type: ignore[union-attr]


@pytest.mark.slow
@pytest.mark.prefect
def test_pull_request_mode_waits_for_the_merge_then_resumes(
    prefect_harness: None, tiny_model: Path, site: Path
) -> None:
    import subprocess

    from flows.promote import promote, resume

    config = site / "promotion.yaml"
    config.write_text(config.read_text().replace("{url: ./remote.git}", "{url: ./remote.git, mode: pull-request}"))
    work = str(site / "work")
    record = promote(str(tiny_model), "local", config=str(config), workdir=work)
    assert record["decision"] == "waiting" and "waiting for merge" in record["reason"]
    assert history(site) == [], "nothing on the tracked branch before the merge"
    with pytest.raises(TerminalError, match="is not merged"):
        resume("local", record["id"], config=str(config), workdir=work)
    git = ["git", "--git-dir", str(site / "remote.git")]
    subprocess.run([*git, "update-ref", "refs/heads/main", f"refs/heads/{record['branch']}"], check=True)  # merged
    done = resume("local", record["id"], config=str(config), workdir=work)
    assert done["decision"] == "promoted" and done["id"] == record["id"]
    assert history(site) == [f"promote:{record['artifact']['id']}"]


def test_modelctl_promote_needs_a_model_or_resume(site: Path) -> None:
    from typer.testing import CliRunner

    from flows.cli import app

    result = CliRunner().invoke(app, ["promote", "--env", "local", "-c", str(site / "promotion.yaml")])
    assert result.exit_code == 2 and "name the model to promote" in result.output
    assert history(site) == []


def test_a_cached_step_result_is_keyed_by_the_shape_of_its_result(monkeypatch: pytest.MonkeyPatch) -> None:
    """Prefect keeps cached step results as pickles: once a result type gains a field, the old pickle must not be
    found again (it would come back without the field and fail far from here)."""
    from pydantic import create_model

    from flows import steps
    from pipeline.steps import OUTPUTS

    before = steps.result_schema("quantize")
    assert before == steps.result_schema("quantize") and before != steps.result_schema("preload")
    grown = create_model("GrownArtifact", __base__=OUTPUTS["quantize"], added=(int, 0))
    monkeypatch.setitem(OUTPUTS, "quantize", grown)
    steps.result_schema.cache_clear()
    try:
        assert steps.result_schema("quantize") != before
    finally:
        steps.result_schema.cache_clear()


def test_a_quantize_step_on_a_cluster_volume_is_never_a_prefect_cache_hit(tmp_path: Path) -> None:
    """Its artifact lives on the cluster's volume, which this process cannot see: a cached result would outlive the
    volume (a new cluster, a deleted artifact) and skip the build. The Job's own skip decides; here it is cached
    only while the artifact is on local disk."""
    from flows import steps
    from tests.test_jobs import QUANTIZE

    assert steps.step_key(None, {"request": QUANTIZE, "env_name": "staging"}) is None  # type: ignore[arg-type]
    from pipeline.quantize import Recipe

    local = QUANTIZE.model_copy(update={"out_root": str(tmp_path), "recipe": Recipe(method="none")})
    key = steps.step_key(None, {"request": local, "env_name": "local"})  # type: ignore[arg-type]
    assert key is not None and "absent" in key
