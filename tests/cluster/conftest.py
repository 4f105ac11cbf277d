"""Fixtures for tests of the fake cluster itself (tests elsewhere import them from cluster.fixtures)."""

from __future__ import annotations

from .fixtures import cluster_fixture, gitops_repo_fixture

__all__ = ["cluster_fixture", "gitops_repo_fixture"]
