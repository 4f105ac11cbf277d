"""An environment's promotion slot: one holder at a time, never held for good by a dead or silent one.

Time is a replaceable clock: tests move it instead of waiting. The killed-holder case with a real ``kill -9`` is in
test_processes.py.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.errors import LeaseHeld, TerminalError
from pipeline.slot import Slot, environment_slot, process_start


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def test_a_live_holder_keeps_the_slot_and_the_refusal_names_it_and_a_working_command(tmp_path: Path) -> None:
    clock = Clock()
    first = Slot("staging", tmp_path, ttl_s=60, clock=clock).acquire("promotion-a")

    with pytest.raises(LeaseHeld) as refused:
        Slot("staging", tmp_path, ttl_s=60, clock=clock).acquire("promotion-b")

    assert refused.value.holder == f"promotion-a (pid {os.getpid()} on {socket.gethostname()})"
    assert refused.value.since == first.since_text()
    assert "modelctl lease release --env staging" in (refused.value.hint or "")
    assert Slot("prod", tmp_path, clock=clock).acquire("promotion-b").env == "prod", "other environments are free"


def test_an_expired_lease_is_taken_over_and_a_renewed_one_is_not(tmp_path: Path) -> None:
    clock = Clock()
    slot = Slot("staging", tmp_path, ttl_s=60, clock=clock)
    held = slot.acquire("promotion-a")
    clock.now += 50
    held = slot.renew(held)
    clock.now += 50  # 100 s after taking it, 50 s after renewing: still live
    with pytest.raises(LeaseHeld):
        slot.acquire("promotion-b")
    clock.now += 11
    assert slot.stale(held) == "its lease expired"
    taken = slot.acquire("promotion-b")
    assert taken.holder == "promotion-b"
    with pytest.raises(TerminalError, match="taken over by promotion-b"):
        slot.renew(held)


def test_a_dead_holder_on_this_host_is_taken_over_at_once(tmp_path: Path) -> None:
    clock = Clock()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    lease = {"env": "staging", "holder": "promotion-a", "host": socket.gethostname(), "pid": pid}
    lease |= {"started": "12345", "since": clock.now, "expires": clock.now + 600}
    (tmp_path / "staging.json").write_text(json.dumps(lease))

    slot = Slot("staging", tmp_path, clock=clock)
    assert slot.stale(slot.current()) == f"its process {pid} is gone"  # type: ignore[arg-type]
    assert slot.acquire("promotion-b").holder == "promotion-b"


def test_a_reused_pid_is_not_mistaken_for_the_holder(tmp_path: Path) -> None:
    clock = Clock()
    me = os.getpid()
    lease = {"env": "staging", "holder": "old", "host": socket.gethostname(), "pid": me, "started": "1"}
    lease |= {"since": clock.now, "expires": clock.now + 600}
    (tmp_path / "staging.json").write_text(json.dumps(lease))
    assert process_start(me) != "1"
    assert Slot("staging", tmp_path, clock=clock).acquire("new").holder == "new"


def test_the_context_releases_the_slot_even_when_the_block_fails(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError), environment_slot("staging", "promotion-a", tmp_path):
        assert Slot("staging", tmp_path).current() is not None
        raise RuntimeError("the promotion failed")
    assert Slot("staging", tmp_path).current() is None
    with environment_slot("staging", "promotion-b", tmp_path) as lease:
        assert lease.holder == "promotion-b"


def test_modelctl_lease_release_frees_a_slot_and_refuses_a_live_holder_without_force(tmp_path: Path) -> None:
    runner = CliRunner()
    Slot("staging", tmp_path).acquire("promotion-a")

    shown = runner.invoke(app, ["lease", "show", "--env", "staging", "--root", str(tmp_path)])
    assert shown.exit_code == 0 and "held; holder promotion-a" in shown.output
    refused = runner.invoke(app, ["lease", "release", "--env", "staging", "--root", str(tmp_path)])
    assert refused.exit_code == 2 and "--force" in refused.output
    assert Slot("staging", tmp_path).current() is not None

    freed = runner.invoke(app, ["lease", "release", "--env", "staging", "--root", str(tmp_path), "--force"])
    assert freed.exit_code == 0 and "released the slot of promotion-a" in freed.output
    assert Slot("staging", tmp_path).current() is None
    again = runner.invoke(app, ["lease", "release", "--env", "staging", "--root", str(tmp_path)])
    assert again.exit_code == 0 and "free already" in again.output
