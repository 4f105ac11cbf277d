"""Deployable: the pipeline image's Dockerfile, the Kubernetes work pool's template, and a deployment run for real.

The image cannot be built here (no Docker engine), so the Dockerfile is linted with hadolint (the `test` extra)
and checked against the checkout and the Makefile. The slow test starts a real Prefect server and a real process
worker, deploys `promote-local` from flows/prefect.yaml and runs it as a schedule would: a flow run created from
the deployment, picked up by the worker, ending in a promotion commit in the GitOps repo.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
TEMPLATE = ROOT / "flows" / "kubernetes-job-template.json"
BIN = Path(sys.executable).parent


# --- the Dockerfile ---------------------------------------------------------------------------------------------


def instructions(text: str) -> list[tuple[str, str]]:
    """The Dockerfile's instructions as (KEYWORD, arguments), continuation lines joined, comments dropped."""
    joined = re.sub(r"\\\n", " ", "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#")))
    found = []
    for line in joined.splitlines():
        if line.strip():
            keyword, _, args = line.strip().partition(" ")
            found.append((keyword.upper(), " ".join(args.split())))
    return found


def pip_installs(commands: list[str]) -> list[list[str]]:
    """Each `pip install` in ``commands`` as its requirements and constraints, install flags and extras dropped.

    `-e '.[test]'` (the Makefile's editable dev install) and `.` (the image's) both read as the project, `.`.
    """
    steps = []
    for command in commands:
        lexer = shlex.shlex(command, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        parts: list[list[str]] = [[]]
        for token in lexer:
            if token in ("&&", "||", ";", "|"):
                parts.append([])
            else:
                parts[-1].append(token)
        for words in parts:
            if "pip" not in words or "install" not in words:
                continue
            args = words[words.index("install") + 1 :]
            kept: list[str] = []
            while args:
                word = args.pop(0)
                if word in ("-c", "--constraint"):
                    kept += ["-c", args.pop(0)]
                elif word in ("-e", "--editable"):
                    continue
                elif word.startswith("-"):
                    continue  # --quiet, --no-cache-dir: how pip runs, not what it installs
                else:
                    kept.append("." if word.startswith(".") else word)
            steps.append(kept)
    return steps


def makefile_venv_installs() -> list[list[str]]:
    """The pip installs of the Makefile's venv recipe (the `$(STAMP)` target), in order."""
    text = (ROOT / "Makefile").read_text(encoding="utf-8")
    recipe = re.search(r"^\$\(STAMP\):.*\n((?:\t.*\n)+)", text, re.MULTILINE)
    assert recipe, "the Makefile has no $(STAMP) recipe"
    return pip_installs([line.strip().replace("$(BIN)/python", "python") for line in recipe.group(1).splitlines()])


def hadolint(path: Path) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("hadolint", path=str(BIN)) or shutil.which("hadolint")
    if exe is None:
        pytest.fail("hadolint is missing: install the test extra (pip install -c constraints.txt -e '.[test]')")
    return subprocess.run([exe, "--no-color", str(path)], capture_output=True, text=True, timeout=60, check=False)


def test_dockerfile_passes_hadolint() -> None:
    result = hadolint(DOCKERFILE)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_names_what_is_wrong_in_a_bad_dockerfile(tmp_path: Path) -> None:
    bad = DOCKERFILE.read_text(encoding="utf-8").replace("--no-cache-dir ", "") + "USER root\n"
    (tmp_path / "Dockerfile").write_text(bad, encoding="utf-8")
    result = hadolint(tmp_path / "Dockerfile")
    assert result.returncode != 0
    assert "DL3042" in result.stdout  # pip without --no-cache-dir
    assert "DL3002" in result.stdout  # the last USER is root


def test_dockerfile_copies_only_what_exists_and_the_build_context_keeps() -> None:
    ignore = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()]
    ignore = [line for line in ignore if line and not line.startswith("#")]
    kept = [p[1:].rstrip("/") for p in ignore if p.startswith("!")]
    copies = [args for keyword, args in instructions(DOCKERFILE.read_text()) if keyword == "COPY"]
    assert copies
    for args in copies:
        *sources, _dest = [a for a in args.split() if not a.startswith("--")]
        for source in sources:
            assert (ROOT / source).exists(), f"COPY {source}: no such file in the checkout"
            assert any(fnmatch.fnmatch(source.rstrip("/"), k) for k in kept), f"{source} is left out by .dockerignore"


def test_dockerfile_installs_with_the_makefile_pins_torch_first() -> None:
    made = makefile_venv_installs()
    assert made == [["torch==2.13.0"], ["-c", "constraints.txt", "."]]
    runs = [args for keyword, args in instructions(DOCKERFILE.read_text()) if keyword == "RUN"]
    assert pip_installs(runs) == made
    assert "torch==2.13.0" in (ROOT / "constraints.txt").read_text().split()
    swapped = ["python -m pip install -c constraints.txt .", "python -m pip install torch==2.13.0"]
    assert pip_installs(swapped) != made  # the order counts


def test_image_runs_as_a_user_and_leaves_the_flow_pod_command_alone() -> None:
    steps = instructions(DOCKERFILE.read_text())
    users = [args for keyword, args in steps if keyword == "USER"]
    assert users and not users[-1].startswith(("root", "0"))
    assert ("WORKDIR", "/app") in steps
    # Kubernetes runs ENTRYPOINT + the container's args; the flow pod's args are `prefect flow-run execute`.
    assert not [args for keyword, args in steps if keyword == "ENTRYPOINT"]
    assert [json.loads(args) for keyword, args in steps if keyword == "CMD"] == [["modelctl", "--help"]]


# --- the Kubernetes work pool's template --------------------------------------------------------------------------


def flow_pod_job(values: dict[str, Any]) -> dict[str, Any]:
    """The Job a Kubernetes worker would create for a flow run, rendered by prefect-kubernetes from the template."""
    from prefect.client.schemas.objects import FlowRun
    from prefect.utilities.templating import apply_values
    from prefect_kubernetes.worker import KubernetesWorkerJobConfiguration

    template = json.loads(TEMPLATE.read_text())
    defaults = KubernetesWorkerJobConfiguration._get_base_config_defaults(template["variables"]["properties"])
    config = KubernetesWorkerJobConfiguration(**apply_values(template["job_configuration"], defaults | values))
    config.prepare_for_flow_run(FlowRun(flow_id=uuid.uuid4(), name="brave-otter"))
    return config.job_manifest


def test_flow_pods_run_in_the_pipeline_namespace_with_its_service_account_and_tokens() -> None:
    job = flow_pod_job({})
    pod = job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert job["metadata"]["namespace"] == "modelctl"
    assert pod["serviceAccountName"] == "modelctl"  # gitops/rbac/pipeline.yaml
    assert container["image"] == "ghcr.io/example-org/modelctl:0.1.0"
    assert container["args"] == ["prefect", "flow-run", "execute"]
    refs = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container["env"] if "valueFrom" in e}
    assert refs == {
        "GITOPS_TOKEN": {"name": "gitops-token", "key": "token"},
        "HF_TOKEN": {"name": "hf-token", "key": "token", "optional": True},
    }
    assert all("value" not in e for e in container["env"] if e["name"] in refs)  # no token in the pool's config
    assert "PREFECT__FLOW_RUN_ID" in {e["name"] for e in container["env"]}  # Prefect's own env still set


def test_flow_pods_stay_off_the_gpu_pool() -> None:
    pod = flow_pod_job({})["spec"]["template"]["spec"]
    assert "nodeSelector" not in pod
    assert "tolerations" not in pod
    assert "nvidia.com/gpu" not in json.dumps(pod)
    variables = json.loads(TEMPLATE.read_text())["variables"]["properties"]
    assert not {"node_selector", "tolerations"} & set(variables)  # a deployment cannot put them back


def test_flow_pod_resources_come_from_the_variables() -> None:
    (default,) = flow_pod_job({})["spec"]["template"]["spec"]["containers"]
    assert default["resources"] == {"requests": {"cpu": "1", "memory": "4Gi"}, "limits": {"memory": "4Gi"}}
    sized = {"cpu_request": "2", "cpu_limit": "3", "memory_request": "6Gi", "memory_limit": "8Gi"}
    (container,) = flow_pod_job(sized | {"namespace": "ml", "gitops_token_secret": "git"})["spec"]["template"]["spec"][
        "containers"
    ]
    assert container["resources"] == {
        "requests": {"cpu": "2", "memory": "6Gi"},
        "limits": {"cpu": "3", "memory": "8Gi"},
    }
    refs = {e["name"]: e["valueFrom"]["secretKeyRef"]["name"] for e in container["env"] if "valueFrom" in e}
    assert refs["GITOPS_TOKEN"] == "git"


# --- a real server, a real worker ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Server:
    url: str
    env: dict[str, str]
    logs: Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start(cmd: list[str], env: dict[str, str], cwd: Path, log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(cmd, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """Stop the process group (a server's or worker's children included), politely first."""
    for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _tail(path: Path, n: int = 4000) -> str:
    return path.read_text(errors="replace")[-n:] if path.is_file() else ""


@pytest.fixture
def prefect_server(tmp_path: Path) -> Iterator[Server]:
    """`prefect server start` on 127.0.0.1 and a free port, with its own PREFECT_HOME and database."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}/api"
    home = tmp_path / "prefect-home"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_") and k != "PYTHONPATH"}
    env |= {
        "PREFECT_HOME": str(home),
        "PREFECT_API_URL": url,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_WORKER_QUERY_SECONDS": "2",
        "PREFECT_WORKER_PREFETCH_SECONDS": "5",
        "PYTHONUNBUFFERED": "1",
    }
    logs = tmp_path / "logs"
    logs.mkdir()
    cmd = [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port), "--no-ui"]
    server = _start(cmd, env, tmp_path, logs / "server.log")
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if server.poll() is not None:
                pytest.fail(f"prefect server exited {server.returncode}:\n{_tail(logs / 'server.log')}")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        else:
            pytest.fail(f"prefect server did not answer on {url}:\n{_tail(logs / 'server.log')}")
        yield Server(url, env, logs)
    finally:
        _stop(server)


def _prefect(server: Server, *args: str, cwd: Path) -> str:
    result = subprocess.run(
        [str(BIN / "prefect"), *args], env=server.env, cwd=cwd, capture_output=True, text=True, timeout=300, check=False
    )
    assert result.returncode == 0, f"prefect {' '.join(args)}:\n{result.stdout[-3000:]}{result.stderr[-3000:]}"
    return result.stdout


def _flow_run_logs(server: Server, run_id: str) -> str:
    body = {"logs": {"flow_run_id": {"any_": [run_id]}}, "sort": "TIMESTAMP_ASC", "limit": 200}
    logs = httpx.post(f"{server.url}/logs/filter", json=body, timeout=10).json()
    return "\n".join(f"{entry['level']} {entry['message']}" for entry in logs)[-6000:]


@pytest.mark.slow
def test_promote_local_deployment_runs_through_a_real_worker(
    prefect_server: Server, tiny_model: Path, tmp_path: Path
) -> None:
    from pipeline.gitops import init_repo

    server = prefect_server
    site = tmp_path / "site"
    site.mkdir()
    example = (ROOT / "examples" / "local" / "promotion.yaml").read_text(encoding="utf-8")
    config = yaml.safe_load(example.replace("../../demo-output/", ""))  # every path under the test's own folder
    config["model"]["source"] = str(tiny_model)
    del config["environments"]["local"]["gates"]  # gates have their own tests: this one is the path to the commit
    (site / "promotion.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    remote = init_repo(site / "gitops-remote.git")

    _prefect(server, "work-pool", "create", "modelctl-process", "--type", "process", cwd=tmp_path)
    _prefect(
        server, "--no-prompt", "deploy", "--prefect-file", "flows/prefect.yaml", "--name", "promote-local", cwd=ROOT
    )
    deployment = httpx.get(f"{server.url}/deployments/name/promote/promote-local", timeout=10).json()
    assert deployment["pull_steps"] == [
        {"prefect.deployments.steps.set_working_directory": {"directory": str(ROOT)}}
    ], "a local deployment runs from the checkout it was deployed from"

    worker_cwd = tmp_path / "elsewhere"  # the worker runs the flow in the checkout, wherever it was started
    worker_cwd.mkdir()
    worker = _start(
        [str(BIN / "prefect"), "worker", "start", "--pool", "modelctl-process", "--type", "process", "--limit", "1"],
        server.env,
        worker_cwd,
        server.logs / "worker.log",
    )
    try:
        parameters = {"model": str(tiny_model), "env": "local", "config": str(site / "promotion.yaml")}
        parameters["workdir"] = str(site / "work")
        created = httpx.post(
            f"{server.url}/deployments/{deployment['id']}/create_flow_run", json={"parameters": parameters}, timeout=10
        )
        assert created.status_code == 201, created.text
        run_id = created.json()["id"]
        state: dict[str, Any] = {}
        deadline = time.monotonic() + 900
        while time.monotonic() < deadline and worker.poll() is None:
            state = httpx.get(f"{server.url}/flow_runs/{run_id}", timeout=10).json()["state"] or {}
            if state.get("type") in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
                break
            time.sleep(3)
        why = f"\nflow run logs:\n{_flow_run_logs(server, run_id)}\nworker:\n{_tail(server.logs / 'worker.log')}"
        assert state.get("type") == "COMPLETED", f"flow run ended {state.get('type')}: {state.get('message')}{why}"
    finally:
        _stop(worker)

    log = subprocess.run(
        ["git", "-C", str(site / "gitops-remote.git"), "log", "--format=%H%n%B%n--end--", "main"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    commits = [c.strip() for c in log.split("--end--") if c.strip()]
    assert len(commits) == 2, log  # the template, then the promotion
    promotion = commits[0]
    assert promotion.split()[0] != remote.commit
    assert "Environment: local" in promotion
    assert "Action: promote" in promotion
    assert f"Flow-Run: {run_id}" in promotion, promotion
