"""Pytest fixtures: a started fake cluster (with a configured official ApiClient) and a real GitOps repository.

``tests/cluster/conftest.py`` offers them to the tests in this folder; other test modules import them:
``from cluster.fixtures import cluster_fixture, gitops_repo_fixture``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import git
import pytest

from sandbox.cluster import FakeCluster, commit_values


@pytest.fixture(name="cluster")
def cluster_fixture() -> Iterator[FakeCluster]:
    """The fake API server on 127.0.0.1 with the Argo Rollouts and Job simulators; ``cluster.api_client``."""
    fake = FakeCluster()
    try:
        yield fake
    finally:
        fake.close()


@pytest.fixture(name="gitops_repo")
def gitops_repo_fixture(tmp_path: Path) -> git.Repo:
    """A real git repository (branch main) with one environment's values file committed."""
    repo = git.Repo.init(tmp_path / "gitops", initial_branch="main")
    with repo.config_writer() as config:
        config.set_value("user", "name", "test")
        config.set_value("user", "email", "test@localhost")
    commit_values(repo, "model:\n  artifactId: art-000001\n", "initial values")
    return repo
