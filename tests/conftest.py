"""Shared test scaffolding: the small model (built once per session) and a Prefect test harness."""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from pipeline.quantize import Artifact

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
# Prefect's ephemeral server (the harness's, and each `modelctl promote` subprocess's) gets 120 s to start instead of
# 20-30 s: on 2 busy cores it sometimes took longer, and the test failed before it ran.
os.environ["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = "120"
# Nothing in the tests may reach the Hub.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

ROOT = Path(__file__).resolve().parent.parent

# The pipeline's own cache (leases, GitOps clones, eval and verify results) is the session's, so a test run beside
# `make demo` neither holds the demo's environment lease nor reuses its results. Only the small model's build cache
# is the machine's (content-addressed by its builder version): the first build on a machine trains, later ones hit.
_USER_CACHE = Path(os.environ.get("MODELCTL_CACHE") or Path.home() / ".cache" / "modelctl")
os.environ["MODELCTL_CACHE"] = tempfile.mkdtemp(prefix="modelctl-cache-")
(_USER_CACHE / "tinymodel").mkdir(parents=True, exist_ok=True)
(Path(os.environ["MODELCTL_CACHE"]) / "tinymodel").symlink_to(_USER_CACHE / "tinymodel", target_is_directory=True)


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

    harness = prefect_test_harness(server_startup_timeout=None)  # None: the 120 s set above
    with temporary_settings({PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}), harness:
        yield


@pytest.fixture(scope="session")
def shared_crds() -> Path:
    """The official Argo CRDs from ../shared/crds (or $MODELCTL_SHARED_CRDS); skip when absent."""
    crds = Path(os.environ.get("MODELCTL_SHARED_CRDS", ROOT.parent / "shared" / "crds"))
    if not crds.is_dir():
        pytest.skip(f"official Argo CRDs not found at {crds} (set MODELCTL_SHARED_CRDS to their folder)")
    return crds


@pytest.fixture(scope="session")
def quantized(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Callable[[str, str], Artifact]:
    """Quantize the small model once per session per (backend, method), with a small calibration set.

    Returns a function ``(backend, method) -> Artifact``; AutoAWQ artifacts are asymmetric (its only format).
    """
    from pipeline.quantize import Calibration, Recipe, quantize
    from pipeline.source import resolve

    out_root = tmp_path_factory.mktemp("artifacts")
    source = resolve(str(tiny_model))
    built: dict[tuple[str, str], Artifact] = {}

    def build(backend: str, method: str) -> Artifact:
        if (backend, method) not in built:
            recipe = Recipe(
                method=method,  # type: ignore[arg-type]
                symmetric=backend != "autoawq",
                calibration=Calibration(samples=16, max_seq_len=64),
            )
            built[(backend, method)] = quantize(source, recipe, out_root, backend)  # type: ignore[arg-type]
        return built[(backend, method)]

    return build


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Fail the run when gitops/rbac refused any call the pipeline made in a cluster test, even one the code
    tolerates (a best-effort log read): the fake API server records them all (sandbox/rbac.py)."""
    rbac = sys.modules.get("sandbox.rbac")
    if rbac is None:
        return
    denied = rbac.describe(use.attrs for use in rbac.session_uses() if not use.allowed)
    if denied:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.write_line(f"gitops/rbac refused the pipeline these calls during the tests: {denied}", red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
