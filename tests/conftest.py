"""Shared test scaffolding: the small model (built once per session) and a Prefect test harness."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

# Prefect reads its settings from the environment: fix them before any test module imports prefect.
# A temporary PREFECT_HOME keeps the user's profile and database out of the tests; no telemetry; no
# connection to a server the developer may have configured.
os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="modelctl-prefect-home-")
os.environ["DO_NOT_TRACK"] = "1"
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ.pop("PREFECT_API_URL", None)
os.environ.pop("PREFECT_API_KEY", None)
os.environ.pop("PREFECT_FLOWS_HEARTBEAT_FREQUENCY", None)
os.environ.pop("PREFECT_RUNNER_HEARTBEAT_FREQUENCY", None)
# Nothing in the tests may reach the Hub.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    """The small trained model, built once per machine (then a cache hit). Treat it as read-only."""
    from pipeline import tinymodel

    return tinymodel.build().path


@pytest.fixture(scope="session")
def prefect_harness() -> Iterator[None]:
    """Prefect's test harness: a temporary server and database, flow heartbeats off."""
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    with temporary_settings({PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}), prefect_test_harness():
        yield


@pytest.fixture(scope="session")
def shared_crds() -> Path:
    """The official Argo CRDs from ../shared/crds (or $MODELCTL_SHARED_CRDS); skip when absent."""
    crds = Path(os.environ.get("MODELCTL_SHARED_CRDS", ROOT.parent / "shared" / "crds"))
    if not crds.is_dir():
        pytest.skip(f"official Argo CRDs not found at {crds} (set MODELCTL_SHARED_CRDS to their folder)")
    return crds
