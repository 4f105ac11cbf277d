"""The pipeline's clone of the GitOps repo: made atomically, and one writer at a time (an inter-process lock).

Every ``modelctl`` process with the same ``$MODELCTL_CACHE`` shares one clone; without a lock one process resets
the clone while another commits or pushes in it (a push reported for a commit that never landed, ``index.lock``
failures, a half-made clone read by another process). The lock is ``fcntl.flock`` on ``<clone>.lock``: the kernel
drops it when its holder dies, so a killed process never leaves the clone locked. It is re-entrant within a
process (a public method may call another).
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from git import GitCommandError, InvalidGitRepositoryError, NoSuchPathError, Repo

from pipeline.errors import TerminalError, TransientError
from pipeline.gitops.remote import classify
from pipeline.secrets import redact


class CloneLock:
    """An exclusive, re-entrant, inter-process lock on ``<workdir>.lock``; waits up to ``wait_s`` for it."""

    def __init__(self, workdir: Path, wait_s: float = 600.0) -> None:
        self.workdir = workdir
        self.path = workdir.with_name(workdir.name + ".lock")
        self.wait_s = wait_s
        self._thread = threading.RLock()
        self._depth = 0
        self._handle: IO[str] | None = None

    def _acquire(self) -> IO[str]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+", encoding="utf-8")  # noqa: SIM115 - held open while the lock is held
        deadline = time.monotonic() + self.wait_s
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    handle.seek(0)
                    holder = handle.read().strip() or "unknown"
                    handle.close()
                    raise TransientError(
                        f"the GitOps clone {self.workdir} stayed in use by another modelctl process "
                        f"({holder}) for {self.wait_s:g} s",
                        hint="wait for the other command to finish, then run this one again",
                    ) from None
                time.sleep(0.05)  # a poll interval while another process works in the clone, not a timing
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()}\n")
        handle.flush()
        return handle

    @contextmanager
    def held(self) -> Iterator[None]:
        """Hold the lock for the block (nested blocks in the same process share one hold)."""
        with self._thread:
            if self._depth == 0:
                self._handle = self._acquire()
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1
                if self._depth == 0 and self._handle is not None:
                    fcntl.flock(self._handle, fcntl.LOCK_UN)
                    self._handle.close()
                    self._handle = None


def clone_into(url: str, workdir: Path, branch: str, env: dict[str, str], token_env: str) -> Repo:
    """The clone in ``workdir``, made (atomically: cloned beside it, then renamed into place) when missing.

    Raises:
        TerminalError: the workdir holds something else, or the remote refused.
        TransientError: the remote could not be reached.
    """
    if (workdir / ".git").is_dir():
        try:
            repo = Repo(workdir)
            origin = repo.remotes.origin.url
        except (InvalidGitRepositoryError, NoSuchPathError, AttributeError, ValueError):
            raise TerminalError(
                f"{workdir} is a damaged clone of the GitOps repo", hint=f"delete {workdir}; the next run clones again"
            ) from None
        if origin != url:
            raise TerminalError(
                f"{workdir} is a clone of {redact(origin)}, not of {redact(url)}",
                hint="pass another working directory, or delete this one",
            )
        return repo
    if workdir.exists() and any(workdir.iterdir()):
        raise TerminalError(f"{workdir} exists and is not a clone of the GitOps repo", hint="pass an empty dir")
    for stale in workdir.parent.glob(f"{workdir.name}.cloning-*"):  # a clone killed half-way (we hold the lock)
        shutil.rmtree(stale, ignore_errors=True)
    staging = workdir.with_name(f"{workdir.name}.cloning-{os.getpid()}")
    staging.parent.mkdir(parents=True, exist_ok=True)
    try:
        Repo.clone_from(url, staging, env=env, branch=branch)
        if workdir.exists():
            workdir.rmdir()
        os.rename(staging, workdir)
    except GitCommandError as exc:
        raise classify(exc, f"cloning the GitOps repo {redact(url)}", url, token_env) from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return Repo(workdir)


def default_workdir(url: str, branch: str) -> Path:
    """Where the pipeline keeps its clone of a GitOps repo: ``$MODELCTL_CACHE/gitops/<hash of url and branch>``."""
    root = Path(os.environ.get("MODELCTL_CACHE") or Path.home() / ".cache" / "modelctl")
    return root / "gitops" / hashlib.sha256(f"{url}#{branch}".encode()).hexdigest()[:16]
