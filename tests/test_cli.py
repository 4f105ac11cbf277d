"""`modelctl` as a user runs it: exit codes, tables, --json, and errors without tracebacks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from pipeline.cli import app

ROOT = Path(__file__).resolve().parent.parent
runner = CliRunner()


def test_config_check_prints_the_resolved_configuration() -> None:
    result = runner.invoke(app, ["config", "check", str(ROOT / "examples" / "cluster" / "promotion.yaml")])
    assert result.exit_code == 0, result.output
    assert "is valid: 2 environment(s), in order staging -> prod" in result.output
    assert "resolved configuration" in result.output
    assert "consecutive_passes: 3" in result.output


def test_config_check_json() -> None:
    result = runner.invoke(app, ["config", "check", str(ROOT / "examples" / "local" / "promotion.yaml"), "--json"])
    assert result.exit_code == 0
    data = json.loads(result.stdout)
    assert data["ok"] is True and data["order"] == ["local"]
    assert data["config"]["environments"]["local"]["executor"] == "local"


def test_config_check_reports_errors_with_exit_code_2(tmp_path: Path) -> None:
    bad = tmp_path / "promotion.yaml"
    bad.write_text("version: 1\ngitops: {url: ./g}\nenvironments:\n  dev:\n    cache: {root: ./c}\n")
    result = runner.invoke(app, ["config", "check", str(bad)])
    assert result.exit_code == 2
    assert "environments.dev.values_file: is required but missing" in result.output
    assert "Traceback" not in result.output

    result = runner.invoke(app, ["config", "check", str(bad), "--json"])
    assert result.exit_code == 2
    data = json.loads(result.stdout)
    assert data["ok"] is False and data["error"] == "terminal"
    assert data["problems"] == [f"{bad}:4: environments.dev.values_file: is required but missing"]


def test_tinymodel_build_json_is_a_cache_hit(tiny_model: Path, tmp_path: Path) -> None:
    result = runner.invoke(app, ["tinymodel", "build", str(tmp_path / "tiny"), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["cached"] is True
    assert data["scores"]["multiple_choice"] >= 0.9
    assert (tmp_path / "tiny" / "model.safetensors").is_file()


def test_tinymodel_score_of_a_non_model_says_so(tmp_path: Path) -> None:
    result = runner.invoke(app, ["tinymodel", "score", str(tmp_path)])
    assert result.exit_code == 2
    assert "is not a model directory" in result.output


def test_console_script_is_installed() -> None:
    script = Path(sys.executable).parent / "modelctl"
    result = subprocess.run([str(script), "--help"], capture_output=True, text=True, check=False)
    assert result.returncode == 0
    assert "tinymodel" in result.stdout and "config" in result.stdout
    module = subprocess.run([sys.executable, "-m", "pipeline", "version", "--json"], capture_output=True, text=True)
    assert module.returncode == 0, module.stderr
    assert json.loads(module.stdout)["torch"].startswith("2.13.0")


def test_config_check_resolves_suites_and_values_files_before_any_work(tmp_path: Path) -> None:
    from pipeline.gitops import init_repo

    init_repo(tmp_path / "remote.git")
    good = (
        "version: 1\ngitops: {url: ./remote.git}\nenvironments:\n  prod:\n    values_file: envs/prod/values.yaml\n"
        "    cache: {root: ./c}\n    gates: {eval: {suite: smoke}}\n"
    )
    config = tmp_path / "promotion.yaml"
    config.write_text(good)
    ok = runner.invoke(app, ["config", "check", str(config), "--json"])
    assert ok.exit_code == 0, ok.output
    assert json.loads(ok.stdout)["suites"]["prod"].endswith("smoke.yaml")

    config.write_text(good.replace("suite: smoke", "suite: smoek").replace("envs/prod/", "envs/prd/"))
    bad = runner.invoke(app, ["config", "check", str(config), "--json"])
    assert bad.exit_code == 2
    problems = json.loads(bad.stdout)["problems"]
    assert any("environments.prod.gates.eval.suite: 'smoek'" in p and "known:" in p for p in problems), problems
    assert any("envs/prd/values.yaml does not exist on main of" in p for p in problems), problems
    assert not (tmp_path / "c").exists(), "nothing was written"


# A tiny app built like `modelctl` whose commands raise what libraries raise; run as a real process.
FAULTS = """
import errno, sys
from pipeline.cli.render import DebugFlag, ModelctlApp, set_debug
from pipeline.record import PromotionRecord
app = ModelctlApp(pretty_exceptions_enable=False, add_completion=False)
@app.callback()
def _options(debug: DebugFlag = False) -> None:
    set_debug(debug)
@app.command()
def fault(kind: str) -> None:
    if kind == "bad-id":
        PromotionRecord(id="BAD!id", env="prod")
    if kind == "enospc":
        raise OSError(errno.ENOSPC, "No space left on device", "/cache/model.safetensors.partial")
    if kind == "denied":
        raise PermissionError(errno.EACCES, "Permission denied", "/cache/leases/prod.json")
    if kind == "reset":
        raise ConnectionResetError("connection reset by peer")
    raise RuntimeError("a bug")
app()
"""


def run_fault(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("MODELCTL_DEBUG", None)
    return subprocess.run([sys.executable, "-c", FAULTS, *args], capture_output=True, text=True, env=env, check=False)


def test_every_error_class_gets_one_clear_line_and_its_exit_code_without_a_traceback() -> None:
    bad_id = run_fault("fault", "bad-id")
    assert bad_id.returncode == 2 and "error: invalid input: id: String should match pattern" in bad_id.stderr
    full = run_fault("fault", "enospc")
    assert full.returncode == 2 and "no space left on the device writing /cache/model.safetensors" in full.stderr
    denied = run_fault("fault", "denied")
    assert denied.returncode == 2, "a permission error is not transient"
    assert "permission denied: /cache/leases/prod.json" in denied.stderr
    reset = run_fault("fault", "reset")
    assert reset.returncode == 75 and "connection reset by peer" in reset.stderr
    bug = run_fault("fault", "bug")
    assert bug.returncode == 1 and "unexpected RuntimeError: a bug" in bug.stderr and "--debug" in bug.stderr
    for result in (bad_id, full, denied, reset, bug):
        assert "Traceback" not in result.stderr + result.stdout
        assert len(result.stderr.strip().splitlines()) <= 3, result.stderr
    loud = run_fault("--debug", "fault", "bug")
    assert loud.returncode == 1 and "Traceback" in loud.stderr and "RuntimeError: a bug" in loud.stderr
