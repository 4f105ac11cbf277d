"""Every input a promotion needs, checked before any heavy work: a failure here has written nothing.

``modelctl config check`` and the start of a promotion call :func:`check`: each environment's eval suite is read
and validated by name, and each ``values_file`` exists in the GitOps repo whenever the repo can be read without
the network (a local repository, or the pipeline's existing clone as last fetched).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from pipeline.config import PromotionConfig
from pipeline.errors import ConfigError, PipelineError
from pipeline.secrets import redact


def _local_git_dir(cfg: PromotionConfig) -> tuple[Path, str] | None:
    """A git directory holding the GitOps branch that can be read offline, with the ref to read; else None."""
    from pipeline.gitops.clone import default_workdir

    url = cfg.gitops.url
    if Path(url).is_dir():  # a local repository (bare or not): the remote itself
        return Path(url), f"refs/heads/{cfg.gitops.branch}"
    clone = default_workdir(url, cfg.gitops.branch)
    if (clone / ".git").is_dir():  # the pipeline's clone, as last fetched
        return clone, f"refs/remotes/origin/{cfg.gitops.branch}"
    return None


def _exists(git_dir: Path, ref: str, name: str) -> bool | None:
    """True/False when ``ref:name`` is/is not in the repo; None when the ref itself cannot be read."""
    run = ["git", "-C", str(git_dir), "cat-file", "-e"]
    if subprocess.run([*run, f"{ref}^{{commit}}"], capture_output=True, check=False).returncode != 0:
        return None
    return subprocess.run([*run, f"{ref}:{name}"], capture_output=True, check=False).returncode == 0


def values_file_problems(cfg: PromotionConfig) -> list[str]:
    """One line per environment whose values file is missing from the GitOps repo (none when it cannot be read)."""
    found = _local_git_dir(cfg)
    if found is None:
        return []
    git_dir, ref = found
    problems = []
    for name, env in cfg.environments.items():
        there = _exists(git_dir, ref, env.values_file)
        if there is False:
            problems.append(
                f"environments.{name}.values_file: {env.values_file} does not exist on {cfg.gitops.branch} of "
                f"{redact(cfg.gitops.url)}"
            )
    return problems


def check(cfg: PromotionConfig, path: str = "promotion.yaml") -> dict[str, str]:
    """Validate what the configuration names outside itself; returns each environment's eval suite file.

    Raises:
        ConfigError: an unknown or invalid suite, a values file missing from the GitOps repo (every problem named).
    """
    from pipeline.evaluate.suite import load_suite

    problems: list[str] = []
    suites: dict[str, str] = {}
    for name, env in cfg.environments.items():
        if env.gates.eval is None:
            continue
        try:
            suites[name] = str(load_suite(env.gates.eval.suite).path)
        except PipelineError as exc:
            detail = "; ".join(getattr(exc, "problems", None) or [exc.what])
            hint = f" ({exc.hint})" if exc.hint else ""
            problems.append(f"environments.{name}.gates.eval.suite: {env.gates.eval.suite!r}: {detail}{hint}")
    problems += values_file_problems(cfg)
    if problems:
        raise ConfigError(path, problems, hint="fix these before promoting: nothing was built or written")
    return suites
