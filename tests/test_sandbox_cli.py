"""`modelctl sandbox up | down | status` with a stand-in for `python -m sandbox run` (a tiny script that starts a
child in its group and a "pod" in a session of its own, writes state.json and waits), so these tests need no vLLM.
Every test checks that no process of the stand-in is left."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

import sandbox.cli as sandbox_cli
from pipeline.cli import app
from sandbox.cli import alive, stop

# argv: DIR MODE. MODE ready: state.json, then wait; SIGTERM ends the pod, then itself (as the sandbox does).
# die: a line of log, exit 3. mute: never ready. stubborn: ready, but ignores SIGTERM, and so does its pod.
STAND_IN = r"""
import json, os, signal, subprocess, sys, time
directory, mode = sys.argv[1], sys.argv[2]
print("sandbox stand-in starting", flush=True)
if mode == "die":
    print("error: vLLM exited with code 1 (boom)", file=sys.stderr, flush=True)
    sys.exit(3)
sleeper = [sys.executable, "-c", "import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\ntime.sleep(300)"]
grouped = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
pod = subprocess.Popen(sleeper if mode == "stubborn" else sleeper[:2] + ["import time; time.sleep(300)"],
                       start_new_session=True)
with open(os.path.join(directory, "children.json"), "w") as f:
    json.dump([grouped.pid, pod.pid], f)
def close(*_):
    pod.terminate(); pod.wait(); sys.exit(0)
signal.signal(signal.SIGTERM, signal.SIG_IGN if mode == "stubborn" else close)
if mode != "mute":
    state = {"pid": os.getpid(), "kubeconfig": os.path.join(directory, "kubeconfig"),
             "config": os.path.join(directory, "promotion.yaml"), "prometheus_url": "http://127.0.0.1:9090",
             "services": {"llm-sandbox/llm-inference": "http://127.0.0.1:18000"}, "simulated": True}
    with open(os.path.join(directory, "state.json.tmp"), "w") as f:
        json.dump(state, f)
    os.replace(os.path.join(directory, "state.json.tmp"), os.path.join(directory, "state.json"))
while True:
    time.sleep(1)
"""

runner = CliRunner()


@pytest.fixture
def sandbox_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A sandbox folder whose `up` starts the stand-in (mode from the file MODE, default ready); stopped after."""
    directory = tmp_path / "sandbox"

    def command(where: Path, gitops: Path, traffic: float) -> list[str]:
        mode = (tmp_path / "MODE").read_text() if (tmp_path / "MODE").exists() else "ready"
        return [sys.executable, "-c", STAND_IN, str(where), mode]

    monkeypatch.setattr(sandbox_cli, "run_command", command)
    try:
        yield directory
    finally:
        stop(directory, grace_s=1.0)


def processes(directory: Path) -> list[int]:
    """The stand-in's pids (itself, its grouped child, its pod) that are still alive."""
    pids = json.loads((directory / "children.json").read_text()) if (directory / "children.json").exists() else []
    state_pid = (directory / "sandbox.pid").read_text().strip() if (directory / "sandbox.pid").exists() else None
    started = [int(state_pid)] if state_pid else []
    return [pid for pid in started + pids if alive(pid)]


def test_up_waits_until_ready_and_says_it_is_simulated_then_down_leaves_nothing(sandbox_dir: Path) -> None:
    result = runner.invoke(app, ["sandbox", "up", "--dir", str(sandbox_dir), "--timeout", "60"])
    assert result.exit_code == 0, result.output
    first = result.output.splitlines()[0]
    assert first.startswith("SIMULATED cluster") and "Prometheus are real" in result.output
    state = json.loads((sandbox_dir / "state.json").read_text())
    assert f"kubeconfig  {state['kubeconfig']}" in result.output and "http://127.0.0.1:18000" in result.output
    assert (sandbox_dir / "gitops.git").is_dir(), "the default GitOps repo was created from the template"
    (grouped, pod) = json.loads((sandbox_dir / "children.json").read_text())
    assert alive(state["pid"]) and alive(grouped) and alive(pod), "up returned, the sandbox runs on"

    down = runner.invoke(app, ["sandbox", "down", "--dir", str(sandbox_dir)])
    assert down.exit_code == 0, down.output
    assert f"stopped the SIMULATED sandbox (pid {state['pid']})" in down.output
    assert not alive(state["pid"]) and not alive(grouped) and not alive(pod)
    assert not (sandbox_dir / "state.json").exists()
    again = runner.invoke(app, ["sandbox", "down", "--dir", str(sandbox_dir)])
    assert again.exit_code == 0 and "nothing to stop" in again.output


def test_up_json_prints_the_state_and_a_second_up_is_refused(sandbox_dir: Path) -> None:
    result = runner.invoke(app, ["sandbox", "up", "--dir", str(sandbox_dir), "--json"])
    assert result.exit_code == 0, result.output
    state = json.loads(result.output)
    assert state["simulated"] is True and state == json.loads((sandbox_dir / "state.json").read_text())
    second = runner.invoke(app, ["sandbox", "up", "--dir", str(sandbox_dir)])
    assert second.exit_code == 2
    assert f"a sandbox already runs in {sandbox_dir.resolve()} (pid {state['pid']})" in second.output
    assert "modelctl sandbox down" in second.output
    assert json.loads((sandbox_dir / "state.json").read_text())["pid"] == state["pid"], "the first one is untouched"
    down = json.loads(runner.invoke(app, ["sandbox", "down", "--dir", str(sandbox_dir), "--json"]).output)
    assert down == {"ok": True, "stopped": state["pid"]} and not processes(sandbox_dir)


def test_a_sandbox_that_dies_while_starting_fails_with_its_log_and_leaves_nothing(
    sandbox_dir: Path, tmp_path: Path
) -> None:
    (tmp_path / "MODE").write_text("die")
    result = runner.invoke(app, ["sandbox", "up", "--dir", str(sandbox_dir)])
    assert result.exit_code == 2, result.output
    assert "the sandbox exited with code 3 before it was ready" in result.output
    assert "vLLM exited with code 1 (boom)" in result.output, "the log's tail is shown"
    assert not (sandbox_dir / "state.json").exists() and not processes(sandbox_dir)


def test_a_sandbox_never_ready_is_stopped_at_the_timeout(sandbox_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "MODE").write_text("mute")
    result = runner.invoke(app, ["sandbox", "up", "--dir", str(sandbox_dir), "--timeout", "1"])
    assert result.exit_code == 75, result.output
    assert "was not ready within 1s" in result.output and "sandbox stand-in starting" in result.output
    assert not processes(sandbox_dir), "the sandbox and its children were stopped"


def test_down_kills_what_ignores_sigterm_including_pods_in_their_own_session(sandbox_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "MODE").write_text("stubborn")
    result = runner.invoke(app, ["sandbox", "up", "--dir", str(sandbox_dir)])
    assert result.exit_code == 0, result.output
    pid = json.loads((sandbox_dir / "state.json").read_text())["pid"]
    (_, pod) = json.loads((sandbox_dir / "children.json").read_text())
    assert os.getpgid(pod) != os.getpgid(pid), "the pod left the sandbox's process group"
    assert stop(sandbox_dir, grace_s=0.5) == pid
    assert not alive(pid) and not alive(pod) and not processes(sandbox_dir)


def test_status_without_a_sandbox_says_how_to_start_one(tmp_path: Path) -> None:
    result = runner.invoke(app, ["sandbox", "status", "--dir", str(tmp_path)])
    assert result.exit_code == 2
    assert "no sandbox runs in" in result.output and "modelctl sandbox up" in result.output


def test_status_lists_applications_rollouts_and_pods_through_the_kubeconfig(sandbox_dir: Path, tmp_path: Path) -> None:
    from pipeline.gitops import init_repo
    from sandbox.cluster import FakeCluster, rollout_manifest
    from sandbox.rbac import ADMIN

    remote = tmp_path / "gitops.git"
    init_repo(remote)
    cluster = FakeCluster()
    try:
        cluster.create_rollout("llm-sandbox", rollout_manifest("llm-inference", [{"setWeight": 50}, {"pause": {}}]))
        cluster.with_argocd(str(remote)).add_application(
            "llm-inference-sandbox", "envs/staging/values.yaml", "llm-sandbox", "llm-inference"
        )
        cluster.tick()
        sandbox_dir.mkdir(parents=True)
        cluster.write_kubeconfig(sandbox_dir / "kubeconfig", ADMIN)  # the path the stand-in's state.json names
        assert runner.invoke(app, ["sandbox", "up", "--dir", str(sandbox_dir), "--gitops", str(remote)]).exit_code == 0
        shown = runner.invoke(app, ["sandbox", "status", "--dir", str(sandbox_dir)], terminal_width=160)
        assert shown.exit_code == 0, shown.output
        assert shown.output.startswith("SIMULATED cluster")
        assert "argocd/llm-inference-sandbox" in shown.output and "Synced" in shown.output
        assert "llm-sandbox/llm-inference" in shown.output and "Healthy" in shown.output
        view = json.loads(runner.invoke(app, ["sandbox", "status", "--dir", str(sandbox_dir), "--json"]).output)
        (rollout,) = view["rollouts"]
        assert view["simulated"] is True and rollout["phase"] == "Healthy" and rollout["stable"] == rollout["canary"]
        assert view["applications"][0]["health"] == "Healthy" and view["pods"] == []

        # The pipeline's own identity (gitops/rbac) may only get its Application and Rollout by name in the
        # namespaces it promotes to: status still shows them. Its 403 probes (a cluster-wide list first) are the
        # status tool's, not the pipeline's: they stay out of the session's record that conftest fails the run on.
        from sandbox.cli_view import cluster_view

        cluster.server.session_record = False

        cluster.create_rollout("llm-staging", rollout_manifest("llm-inference", [{"setWeight": 50}, {"pause": {}}]))
        pipeline = cluster.write_kubeconfig(tmp_path / "pipeline-kubeconfig")
        named = {"applications": [("argocd", "llm-inference-sandbox")], "rollouts": [("llm-staging", "llm-inference")]}
        seen = cluster_view(pipeline, named)
        assert [r["name"] for r in seen["rollouts"] or []] == ["llm-staging/llm-inference"]
        assert [a["name"] for a in seen["applications"] or []] == ["argocd/llm-inference-sandbox"]
        assert cluster_view(pipeline, {})["rollouts"] is None, "not readable: said, not shown as empty"
    finally:
        cluster.close()


def test_a_stale_state_whose_pid_now_belongs_to_another_process_is_never_signalled(sandbox_dir: Path) -> None:
    import subprocess

    other = subprocess.Popen(["sleep", "60"], start_new_session=True)  # took the pid of a sandbox long gone
    try:
        sandbox_dir.mkdir(parents=True)
        (sandbox_dir / "state.json").write_text(json.dumps({"pid": other.pid, "kubeconfig": "x", "simulated": True}))
        down = runner.invoke(app, ["sandbox", "down", "--dir", str(sandbox_dir)])
        assert down.exit_code == 0 and "nothing to stop" in down.output
        assert other.poll() is None, "an unrelated process was signalled"
        assert not (sandbox_dir / "state.json").exists(), "the stale state is cleared"
    finally:
        other.kill()
        other.wait()
