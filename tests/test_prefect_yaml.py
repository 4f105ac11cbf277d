"""flows/prefect.yaml deploys: every deployment lands on the Prefect test server with its pool and schedule."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
@pytest.mark.prefect
def test_prefect_deploy_accepts_the_project_file(prefect_harness: None) -> None:
    from prefect import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.settings import PREFECT_API_URL

    template = json.loads((ROOT / "flows" / "kubernetes-job-template.json").read_text())
    with get_client(sync_client=True) as client:
        client.create_work_pool(WorkPoolCreate(name="modelctl-process", type="process"), overwrite=True)
        client.create_work_pool(
            WorkPoolCreate(name="modelctl-kubernetes", type="kubernetes", base_job_template=template), overwrite=True
        )
    env = {**os.environ, "PREFECT_API_URL": str(PREFECT_API_URL.value())}
    prefect = Path(sys.executable).parent / "prefect"
    result = subprocess.run(
        [str(prefect), "--no-prompt", "deploy", "--all", "--prefect-file", "flows/prefect.yaml"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    with get_client(sync_client=True) as client:
        deployments = {d.name: d for d in client.read_deployments()}
        pools = {p.name: p for p in client.read_work_pools()}
    assert set(deployments) >= {"promote-local", "rollback-local", "promote", "rollback", "watch", "reevaluate"}
    assert deployments["promote-local"].work_pool_name == "modelctl-process"
    assert deployments["promote"].work_pool_name == "modelctl-kubernetes"
    assert [s.schedule.cron for s in deployments["watch"].schedules] == ["*/30 * * * *"]  # type: ignore[union-attr]
    assert [s.schedule.cron for s in deployments["reevaluate"].schedules] == ["17 * * * *"]  # type: ignore[union-attr]
    assert [s.schedule.cron for s in deployments["guard"].schedules] == ["*/5 * * * *"]  # type: ignore[union-attr]
    defaults = pools["modelctl-kubernetes"].base_job_template["variables"]["properties"]
    assert defaults["namespace"]["default"] == "modelctl"
    assert "tolerations" not in defaults  # flow pods stay off the GPU pool; only the step Jobs go there
    cluster = {"directory": "/app"}  # the image's code, no git pull
    assert deployments["promote"].pull_steps == [{"prefect.deployments.steps.set_working_directory": cluster}]
    local = {"directory": str(ROOT)}  # the checkout it was deployed from
    assert deployments["promote-local"].pull_steps == [{"prefect.deployments.steps.set_working_directory": local}]
