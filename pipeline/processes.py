"""Child processes that die with their parent, grandchildren included (servers, vLLM engines and workers).

:func:`start` runs a command in its own process group (its own session, so a terminal's Ctrl-C reaches it only
through us) with a parent-death signal (``prctl(PR_SET_PDEATHSIG, SIGKILL)``: the kernel kills the child when
the parent dies, even by ``kill -9``). That signal does not reach grandchildren, so a small watchdog process waits
on a pipe whose write end only the parent holds: when the parent dies the pipe closes and the watchdog kills the
whole group. :func:`stop` ends the group (SIGTERM, then SIGKILL) and its watchdog.

Note: Linux sends the parent-death signal when the *thread* that started the child exits; start children from the
thread that owns their lifetime (the one that will call :func:`stop`).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

PR_SET_PDEATHSIG = 1

# The watchdog: block until the parent's pipe closes (the parent died or stopped the child), then end the group.
_WATCHDOG = """
import os, signal, sys, time
fd, pgid = int(sys.argv[1]), int(sys.argv[2])
while os.read(fd, 1):
    pass
def alive():
    try:
        os.killpg(pgid, 0)
        return True
    except OSError:
        return False
if alive():
    os.killpg(pgid, signal.SIGTERM)
    deadline = time.monotonic() + float(sys.argv[3])
    while alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    if alive():
        os.killpg(pgid, signal.SIGKILL)
"""

_watchdogs: dict[int, tuple[int, subprocess.Popen[bytes]]] = {}


def _die_with(parent: int) -> Callable[[], None]:
    """A preexec_fn: ask the kernel for SIGKILL when the parent dies; exit at once if it already has.

    prctl is looked up here, in the parent: the forked child only calls it (no dlopen after fork).
    """
    prctl = ctypes.CDLL(None, use_errno=True).prctl

    def arm() -> None:
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)

    return arm


def start(cmd: Sequence[str], *, grace_s: float = 10.0, **popen: Any) -> subprocess.Popen[bytes]:
    """Start ``cmd`` as the leader of a new process group that dies with this process (see the module doc).

    ``popen`` is passed to :class:`subprocess.Popen` (stdout, stderr, env, cwd...).
    """
    proc: subprocess.Popen[bytes] = subprocess.Popen(
        list(cmd), start_new_session=True, preexec_fn=_die_with(os.getpid()), **popen
    )
    read_end, write_end = os.pipe()
    try:
        watchdog = subprocess.Popen(
            [sys.executable, "-I", "-S", "-c", _WATCHDOG, str(read_end), str(proc.pid), str(grace_s)],
            pass_fds=(read_end,),
            start_new_session=True,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    except BaseException:
        os.close(write_end)
        stop(proc, grace_s=0)
        raise
    finally:
        os.close(read_end)
    _watchdogs[proc.pid] = (write_end, watchdog)
    return proc


def group_members(pgid: int) -> list[int]:
    """The live (not zombie) processes of group ``pgid``, read from /proc."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[-1].split()
        except OSError:
            continue
        if fields[0] not in ("Z", "X") and int(fields[2]) == pgid:
            found.append(int(stat.parent.name))
    return found


def group_alive(pgid: int) -> bool:
    """True while any process of group ``pgid`` is alive (zombies waiting to be reaped do not count)."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return bool(group_members(pgid)) if Path("/proc/self/stat").exists() else True


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def stop(proc: subprocess.Popen[bytes], grace_s: float = 10.0) -> None:
    """Stop the child's whole process group: SIGTERM, then SIGKILL after ``grace_s``; then its watchdog."""
    if proc.poll() is None:
        _signal_group(proc.pid, signal.SIGTERM)
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            _signal_group(proc.pid, signal.SIGKILL)
            proc.wait()
    deadline = time.monotonic() + grace_s
    while group_alive(proc.pid) and time.monotonic() < deadline:  # grandchildren still shutting down
        time.sleep(0.05)
    _signal_group(proc.pid, signal.SIGKILL)
    found = _watchdogs.pop(proc.pid, None)
    if found is not None:
        write_end, watchdog = found
        os.close(write_end)
        watchdog.wait()


# The descendants' watchdog: while the watched process lives, note its whole tree every ``interval`` (ppid links
# from /proc, so children that left its session or group are seen too); once it is gone (this watchdog's parent
# changed), kill every noted process that is still the same process (start time), and whatever they started since.
_TREE_WATCHDOG = """
import os, signal, sys, time
watched, interval = int(sys.argv[1]), float(sys.argv[2])
def table():
    rows = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    fields = f.read().rsplit(")", 1)[-1].split()
            except OSError:
                continue
            if fields[0] not in ("Z", "X"):
                rows[int(name)] = (int(fields[1]), fields[19])
    return rows
def tree(rows, roots):
    found, grew = dict(roots), True
    while grew:
        grew = False
        for pid, (ppid, start) in rows.items():
            if ppid in found and pid not in found and pid != os.getpid():
                found[pid], grew = start, True
    return found
seen = {}
while os.getppid() == watched:
    rows = table()
    seen.update(tree(rows, {watched: None}))
    time.sleep(interval)
seen.pop(watched, None)
for sig in (signal.SIGTERM, signal.SIGKILL):
    for _ in range(20 if sig == signal.SIGTERM else 3):
        rows = table()
        alive = {p: s for p, s in seen.items() if p in rows and rows[p][1] == s}
        alive.update(tree(rows, alive))
        seen.update(alive)
        if not alive:
            sys.exit(0)
        for pid in alive:
            try:
                os.kill(pid, sig)
            except OSError:
                pass
        time.sleep(0.1)
"""


def watch_descendants(interval_s: float = 0.5) -> subprocess.Popen[bytes]:
    """Start a watchdog that kills every descendant of this process once this process dies (even by ``kill -9``).

    For processes :func:`start` does not own: libraries' own subprocesses (Prefect's embedded server) and their
    children, which may have left our group or session. The watchdog notes the tree every ``interval_s`` while we
    live; when we are gone it sends SIGTERM, then SIGKILL after ~2 s, to those still alive. Call it once, early, in
    a command's process (`modelctl promote`); it also ends what is left when the command exits normally.
    """
    return subprocess.Popen(
        [sys.executable, "-I", "-S", "-c", _TREE_WATCHDOG, str(os.getpid()), str(interval_s)],
        start_new_session=True,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
