"""Test-only Kubernetes: a fake API server spoken to over HTTP, and simulators of Argo CD and Argo Rollouts."""
