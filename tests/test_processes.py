"""Children die with their parent, grandchildren included; a killed promotion leaves its slot free.

A real parent process holds an environment's slot and starts a server-like child that starts a grandchild;
``kill -9`` on the parent; then the whole tree it had started (walked in /proc before the kill) must be gone and
the slot takeable. Deaths are polled with a bound, never slept on.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline import processes
from pipeline.slot import Slot

ROOT = Path(__file__).resolve().parent.parent

CHILD = """
import json, os, subprocess, sys, time
grandchild = subprocess.Popen([sys.executable, "-c", "import time\\nwhile True: time.sleep(1)"])
with open(sys.argv[1] + ".tmp", "w") as f:
    json.dump({"child": os.getpid(), "grandchild": grandchild.pid}, f)
os.replace(sys.argv[1] + ".tmp", sys.argv[1])
while True:
    time.sleep(1)
"""

PARENT = f"""
import sys, time
from pathlib import Path
from pipeline import processes
from pipeline.slot import Slot
leases, tree = Path(sys.argv[1]), sys.argv[2]
Slot("local", leases).acquire("promotion-1")
processes.start([sys.executable, "-c", {CHILD!r}, tree])
while True:
    time.sleep(1)
"""


def _ppid_and_state(pid: int) -> tuple[int, str] | None:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()
    except OSError:
        return None
    return int(fields[1]), fields[0]


def alive(pid: int) -> bool:
    found = _ppid_and_state(pid)
    return found is not None and found[1] not in ("Z", "X")


def descendants(pid: int) -> set[int]:
    """Every live process below ``pid`` (walked through /proc's parent links)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        found = _ppid_and_state(int(stat.parent.name))
        if found and found[1] not in ("Z", "X"):
            children.setdefault(found[0], []).append(int(stat.parent.name))
    out, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.add(child)
            todo.append(child)
    return out


def wait_until(check: object, what: str, bound_s: float = 30.0) -> None:
    """Poll ``check()`` until true; fail naming ``what`` after ``bound_s`` (a bound, not a timing)."""
    deadline = time.monotonic() + bound_s
    while not check():  # type: ignore[operator]
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")
def test_kill_9_of_the_parent_leaves_no_survivor_and_frees_the_slot(tmp_path: Path) -> None:
    leases, tree = tmp_path / "leases", tmp_path / "tree.json"
    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT, str(leases), str(tree)], env={**os.environ, "PYTHONPATH": str(ROOT)}
    )
    try:
        wait_until(tree.exists, "the child never started its grandchild")
        started = json.loads(tree.read_text())
        below = descendants(parent.pid)
        assert {started["child"], started["grandchild"]} <= below
        assert len(below) >= 3, "child, grandchild and the watchdog"
        held = Slot("local", leases).current()
        assert held is not None and held.pid == parent.pid and held.holder == "promotion-1"

        os.kill(parent.pid, signal.SIGKILL)
        parent.wait()

        wait_until(lambda: not any(alive(pid) for pid in below), "a process outlived its killed parent")
        assert not [pid for pid in below if alive(pid)]
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
    slot = Slot("local", leases, clock=lambda: held.since + 1)  # well before the lease would expire
    assert slot.stale(held) == f"its process {parent.pid} is gone"
    assert slot.acquire("promotion-2").holder == "promotion-2"


def test_stop_ends_the_whole_group_and_its_watchdog(tmp_path: Path) -> None:
    tree = tmp_path / "tree.json"
    proc = processes.start([sys.executable, "-c", CHILD, str(tree)])
    wait_until(tree.exists, "the child never started its grandchild")
    started = json.loads(tree.read_text())
    _, watchdog = processes._watchdogs[proc.pid]
    assert processes.group_alive(proc.pid) and alive(started["grandchild"])

    processes.stop(proc, grace_s=5)

    assert not processes.group_alive(proc.pid)
    assert not alive(started["child"]) and not alive(started["grandchild"])
    assert watchdog.returncode is not None, "the watchdog ended with its child"
