"""`modelctl gitops init`: a new GitOps repo (bare, as a remote) whose first commit is the template in gitops/.

The template ships with the package (``pipeline.resources``), so an installed ``modelctl`` has it too.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from git import Repo

from pipeline.errors import TerminalError
from pipeline.gitops.commits import CHART
from pipeline.resources import resource_dir

TEMPLATE = resource_dir("gitops")


@dataclass(frozen=True)
class InitResult:
    path: str
    commit: str
    skipped: bool
    files: int


def init_repo(path: str | Path, template: str | Path | None = None, branch: str = "main") -> InitResult:
    """Create a bare GitOps repo at ``path`` whose first commit is the template; a skip if it already has one.

    Raises:
        TerminalError: ``path`` holds something else, or the template is missing.
    """
    target, source = Path(path), Path(template or TEMPLATE)
    if not (source / CHART / "values.schema.json").is_file():
        raise TerminalError(
            f"{source} is not a GitOps template (no {CHART}/values.schema.json)", hint="pass --template"
        )
    if target.exists() and any(target.iterdir()):
        try:
            head = Repo(target).git.rev_parse(f"refs/heads/{branch}")
        except Exception:  # not a repo, or no such branch
            raise TerminalError(f"{target} exists and is not a GitOps repo", hint="pass a new path") from None
        return InitResult(str(target), head, True, 0)
    env = {"GIT_AUTHOR_NAME": "modelctl", "GIT_AUTHOR_EMAIL": "modelctl@localhost"}
    env |= {"GIT_COMMITTER_NAME": "modelctl", "GIT_COMMITTER_EMAIL": "modelctl@localhost"}
    Repo.init(target, bare=True, initial_branch=branch)
    with tempfile.TemporaryDirectory(prefix="modelctl-init-") as tmp:
        work = Path(tmp) / "repo"
        shutil.copytree(source, work, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        repo = Repo.init(work, initial_branch=branch)
        repo.git.update_environment(**env)
        repo.git.add("-A")
        repo.git.commit("-q", "-m", "init: GitOps repo from the modelctl template")
        repo.git.push("-q", str(target.resolve()), f"HEAD:refs/heads/{branch}")
        files = len(repo.git.ls_files().splitlines())
        return InitResult(str(target), repo.head.commit.hexsha, False, files)
