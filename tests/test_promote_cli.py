"""`modelctl promote` as a person runs it, in a subprocess at 100 columns: what the terminal shows.

One line per step, the summary (no raw markdown), the path of the per-run log that holds everything the libraries
printed; a repeat of what already runs is a fast skip keeping the original id; bad input is one clear error,
exit 2, found before Prefect starts (no Prefect database appears in the run's PREFECT_HOME).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from ruamel.yaml import YAML

from pipeline.gitops import GitOps, init_repo

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "local" / "promotion.yaml"
MODELCTL = [sys.executable, "-c", "from flows.cli import main; main()"]
# What libraries print when they reach the terminal: warnings, log records, progress bars, tracebacks, git.
LIBRARY = re.compile(r"Warning|INFO|it/s|Traceback|telemetry|fatal:|DEBUG|sqlite3")
MAX_LINES = 40


def site_config(site: Path, model: Path, cache: Path) -> Path:
    """The example local config, its paths pointed into ``site`` (GitOps remote, store) and at ``cache`` (the
    cache volume, shared by the module so the small model is quantized once); the eval gate kept, the load gate
    dropped to keep the run short."""
    yaml = YAML()
    cfg = yaml.load(EXAMPLE.read_text())
    cfg["gitops"]["url"] = str(site / "remote.git")
    cfg["model"]["source"] = str(model)
    cfg["model"]["quantization"]["method"] = "gptq"
    cfg["model"]["quantization"]["calibration"] = {"samples": 16, "max_seq_len": 64}
    cfg["artifacts"]["path"] = str(cache / "store")
    env = cfg["environments"]["local"]
    env["cache"]["root"] = str(cache / "volume")
    del env["gates"]["load"]
    for extra in [k for k in env["gates"] if k not in ("eval",)]:
        del env["gates"][extra]
    path = site / "promotion.yaml"
    with path.open("w") as f:
        yaml.dump(cfg, f)
    if not (site / "remote.git").exists():
        init_repo(site / "remote.git")
    return path


def modelctl(site: Path, *args: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    """Run `modelctl` as a person would, at 100 columns, with its own Prefect home and cache under ``site``."""
    env = {
        **os.environ,
        "COLUMNS": "100",
        "PREFECT_HOME": str(site / "prefect-home"),
        "MODELCTL_CACHE": str(site / "modelctl-cache"),
        "PYTHONPATH": str(ROOT),
    }
    for name in ("PREFECT_LOGGING_LEVEL", "TQDM_DISABLE", "MODELCTL_DEBUG", "PREFECT_API_URL"):
        env.pop(name, None)
    (site / "prefect-home").mkdir(exist_ok=True)
    return subprocess.run(
        [*MODELCTL, *args], cwd=site, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


def shown(result: subprocess.CompletedProcess[str]) -> list[str]:
    return (result.stdout + result.stderr).splitlines()


def log_of(lines: list[str]) -> Path:
    paths = [line.removeprefix("log: ") for line in lines if line.startswith("log: ")]
    assert len(paths) == 1, lines
    return Path(paths[0])


def prefect_started(site: Path) -> bool:
    """Whether a run made Prefect's database (its embedded server) in the site's PREFECT_HOME."""
    return any((site / "prefect-home").rglob("*.db"))


# --- bad input: found before Prefect starts, one clear error, exit 2 --------------------------------------------


@pytest.fixture
def quick_site(tmp_path: Path) -> Path:
    site_config(tmp_path, tmp_path / "no-model", tmp_path / "cache")
    return tmp_path


def assert_refused(result: subprocess.CompletedProcess[str], *names: str) -> None:
    lines = shown(result)
    assert result.returncode == 2, lines
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1, lines
    assert all(name in errors[0] for name in names), errors
    assert "Traceback" not in result.stderr + result.stdout
    assert not any(line.startswith("log: ") for line in lines)  # refused before the run (and its log) began


def test_a_malformed_id_is_one_line_exit_2_before_prefect(quick_site: Path) -> None:
    result = modelctl(quick_site, "promote", "x", "--env", "local", "-c", "promotion.yaml", "--id", "BAD!id")
    assert_refused(result, "--id", "BAD!id", "not a promotion id")
    assert not prefect_started(quick_site)


def test_an_unknown_env_names_the_file_and_the_known_ones_before_prefect(quick_site: Path) -> None:
    result = modelctl(quick_site, "promote", "x", "--env", "prod", "-c", "promotion.yaml")
    assert_refused(result, "promotion.yaml", "'prod'", "known: local")
    assert not prefect_started(quick_site)


def test_a_missing_config_is_named_exit_2_before_prefect(quick_site: Path) -> None:
    result = modelctl(quick_site, "promote", "x", "--env", "local", "-c", "missing.yaml")
    assert_refused(result, "missing.yaml")
    assert not prefect_started(quick_site)


def test_an_unknown_suite_is_refused_before_prefect_and_writes_nothing(quick_site: Path) -> None:
    path = quick_site / "promotion.yaml"
    path.write_text(path.read_text().replace("suite: smoke", "suite: no-such-suite"))
    result = modelctl(quick_site, "promote", "x", "--env", "local", "-c", "promotion.yaml")
    assert result.returncode == 2, shown(result)
    assert "no-such-suite" in result.stderr and "Traceback" not in result.stderr
    assert not prefect_started(quick_site)
    assert not (quick_site / "cache").exists()  # nothing built, published or preloaded


# --- a real promotion of the small model, then its repeat ---------------------------------------------------------


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("volume")


def assert_readable(lines: list[str]) -> None:
    assert len(lines) <= MAX_LINES, "\n".join(lines)
    library = [line for line in lines if LIBRARY.search(line)]
    assert not library, "\n".join(lines)
    assert not any(line.startswith(("## ", "| ")) for line in lines), "raw markdown on the terminal"
    log = log_of(lines)
    assert log.is_file() and log.stat().st_size > 0


@pytest.mark.slow
def test_promote_prints_steps_and_a_summary_and_a_repeat_is_a_fast_skip(
    tiny_model: Path, tmp_path: Path, shared_cache: Path
) -> None:
    site_config(tmp_path, tiny_model, shared_cache)
    first = modelctl(tmp_path, "promote", str(tiny_model), "--env", "local", "-c", "promotion.yaml")
    lines = shown(first)
    assert first.returncode == 0, "\n".join(lines)
    assert_readable(lines)
    steps = [line.split()[1] for line in lines if line[:1] in "✓=✗"]
    assert {"resolve", "quantize", "publish", "preload", "evaluate", "commit"} <= set(steps), lines
    promoted = [m for line in lines if (m := re.match(r"✓ promoted: promotion (\w{16}) to local", line))]
    assert promoted, lines
    pid = promoted[0].group(1)
    assert prefect_started(tmp_path)  # the check the bad-input tests rely on does see a real run

    again = modelctl(tmp_path, "promote", str(tiny_model), "--env", "local", "-c", "promotion.yaml")
    lines = shown(again)
    assert again.returncode == 0, "\n".join(lines)
    assert_readable(lines)
    assert any(line.startswith(f"= skipped: promotion {pid} to local") for line in lines), lines
    assert any("already runs" in line for line in lines), lines
    assert not [line for line in lines if line[:1] in "✓✗" and line.split()[1] in ("evaluate", "load-test")]
    entries = GitOps.open(str(tmp_path / "remote.git"), tmp_path / "look").history("local")
    assert [e.promotion_id for e in entries] == [pid]  # one commit, under the original id


REJECTED = """
import sys
from flows.cli import _run_promotion
from pipeline.gates import GateResult, GateRow
from pipeline.gating import PromotionRejected
from pipeline.record import PromotionRecord

row = GateRow(name="facts_mc acc", value=0.33, limit=">= 0.8", verdict="fail", why="0.33 is below the floor 0.8")
gate = GateResult(gate="eval", rows=[row])
record = PromotionRecord(id="01m8szczfkb4pgkd", env="local", decision="rejected", reason=gate.summary(),
                         eval_gate=gate)

def start():
    print("Traceback (most recent call last): what Prefect logs on the way out")
    raise PromotionRejected(record, "awq-w4a16-g128-0123456789abcdef")

_run_promotion(False, start)
"""


def test_a_rejected_candidate_shows_its_summary_and_not_the_logs_tail(tmp_path: Path) -> None:
    """A gate's refusal is a decision, not a crash: the terminal shows the decision and the gate that decided."""
    env = {**os.environ, "MODELCTL_CACHE": str(tmp_path), "PYTHONPATH": str(ROOT), "COLUMNS": "100"}
    result = subprocess.run(
        [sys.executable, "-c", REJECTED], env=env, capture_output=True, text=True, timeout=120, check=False
    )
    lines = result.stdout.splitlines()
    assert "PromotionRejected" in result.stderr and "was rejected for local" in result.stderr
    assert any(line.startswith("✗ rejected: promotion 01m8szczfkb4pgkd to local") for line in lines), lines
    assert any(line.startswith("  eval") and "eval gate fail" in line for line in lines), lines
    assert not any("the log ends with" in line or "Traceback" in line for line in lines), lines


@pytest.mark.slow
def test_a_failed_promotion_shows_the_failed_step_and_the_logs_tail(tmp_path: Path, shared_cache: Path) -> None:
    site_config(tmp_path, tmp_path / "no-model", shared_cache)
    result = modelctl(tmp_path, "promote", str(tmp_path / "no-model"), "--env", "local", "-c", "promotion.yaml")
    lines = shown(result)
    assert result.returncode == 2, "\n".join(lines)
    assert any(line.startswith("✗ resolve") for line in lines), lines
    assert any(line.startswith("the log ends with") for line in lines), lines
    assert any(line.startswith("error: ") and "no-model" in line for line in lines), lines


def test_a_decision_pickles_with_its_record() -> None:
    """Prefect may keep a flow's exception: a rejection or a revert comes back with its record and message."""
    import pickle

    from pipeline.gating import PromotionRejected
    from pipeline.promotion import PromotionReverted
    from pipeline.record import PromotionRecord

    record = PromotionRecord(id="01m8szczfkb4pgkd", env="staging", decision="rejected", reason="eval gate fail")
    rejected = pickle.loads(pickle.dumps(PromotionRejected(record, "none-0123456789abcdef", "rebuild it")))
    assert rejected.record == record and rejected.hint == "rebuild it"
    assert rejected.what == "none-0123456789abcdef was rejected for staging, nothing was committed: eval gate fail"
    reverted = pickle.loads(pickle.dumps(PromotionReverted(record.model_copy(update={"decision": "reverted"}))))
    assert reverted.record.decision == "reverted" and "was reverted: eval gate fail" in reverted.what
