"""All Kubernetes API access, through the official client: Argo CD sync, the Rollout, Leases, GPUs, Jobs.

Every call goes through one retry loop: 5xx, 429, timeouts and connection errors are retried with exponential
backoff up to a bound, then raised as :class:`TransientError`; a 409 conflict is re-read and retried by the
operation that made it; anything else is a :class:`TerminalError`. Messages are passed through
:func:`pipeline.secrets.redact` and say what to do. The Argo rules followed here are in ../shared/ARGO.md.

Example:
    >>> kube = Kube.connect()  # doctest: +SKIP
    >>> kube.request_refresh(env.argocd); kube.wait_synced(env.argocd, sha, timeout_s=300)  # doctest: +SKIP
"""

from pipeline.kube.argocd import AppState, ArgoCD
from pipeline.kube.capacity import Capacity, GpuCapacity, NodeGpus
from pipeline.kube.client import ARGO, REFRESH, Backoff, ConflictError, KubeClient, Patch, classify
from pipeline.kube.jobs import JobResult, Jobs
from pipeline.kube.lease import LeaseHold, Leases
from pipeline.kube.rollouts import Rollouts


class Kube(ArgoCD, Rollouts, Leases, Capacity, Jobs):
    """The one door to the Kubernetes API (each area is a module of this package; one retry loop for all)."""


__all__ = [
    "ARGO",
    "REFRESH",
    "AppState",
    "Backoff",
    "ConflictError",
    "GpuCapacity",
    "JobResult",
    "Kube",
    "KubeClient",
    "LeaseHold",
    "NodeGpus",
    "Patch",
    "classify",
]
