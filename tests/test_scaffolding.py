"""The Prefect test harness fixture works: flows run against a temporary server with heartbeats off."""

from __future__ import annotations

import os

import pytest


@pytest.mark.prefect
def test_flow_runs_in_the_harness_and_is_recorded(prefect_harness: None) -> None:
    from prefect import flow, get_client, task
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY

    @task
    def double(x: int) -> int:
        return 2 * x

    @flow(name="scaffolding-check")
    def pipeline_flow(x: int) -> int:
        return double(x) + 1

    assert pipeline_flow(20) == 41
    assert PREFECT_FLOWS_HEARTBEAT_FREQUENCY.value() is None
    assert os.environ["DO_NOT_TRACK"] == "1"
    assert "modelctl-prefect-home-" in os.environ["PREFECT_HOME"]

    async def runs() -> list[str]:
        async with get_client() as client:
            flow_id = (await client.read_flow_by_name("scaffolding-check")).id
            return [r.state_name or "" for r in await client.read_flow_runs() if r.flow_id == flow_id]

    import asyncio

    assert asyncio.run(runs()) == ["Completed"], "the run was recorded by the harness's server"
