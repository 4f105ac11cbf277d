"""The GitOps repo Argo CD watches, and the commits the pipeline makes to it. Git's only door.

    values.py    round-trip edits of Helm values, Helm's merge, the values.schema.json check (pure)
    commits.py   Promotion, the commit subject and trailers, history entries parsed from them
    repo.py      GitOps: a working clone; open, plan, promote, revert, history, current, record
    clone.py     the clone made atomically, and its inter-process lock (one writer per clone)
    remote.py    credentials as an HTTP header in git's environment; git failures, classified and scrubbed
    template.py  `modelctl gitops init`: a new bare repo from the template in gitops/

Example:
    >>> repo = GitOps.open("demo-output/gitops-remote.git", "demo-output/gitops-work")  # doctest: +SKIP
    >>> p = Promotion(env="local", model="org/m", revision="0" * 40, artifact="a1")
    >>> repo.promote(p, "envs/local/values.yaml").commit  # doctest: +SKIP
"""

from pipeline.gitops.commits import CHART, RECORDS, CommitResult, HistoryEntry, Plan, Promotion
from pipeline.gitops.repo import GitOps
from pipeline.gitops.template import TEMPLATE, InitResult, init_repo
from pipeline.gitops.values import check_values, edit_values, helm_merge

__all__ = [
    "CHART",
    "RECORDS",
    "TEMPLATE",
    "CommitResult",
    "GitOps",
    "HistoryEntry",
    "InitResult",
    "Plan",
    "Promotion",
    "check_values",
    "edit_values",
    "helm_merge",
    "init_repo",
]
