"""`modelctl promote` under faults, end to end in a subprocess: a ``kill -9`` mid-run, corrupted warm weights.

1. Killed while its load-test server runs: every process the run had started (Prefect's embedded server, the
   `transformers serve`/vLLM server and whatever they started, whatever their session) is gone, and the
   environment's slot is free to take (the dead holder's lease is taken over; no waiting for expiry).
2. One flipped byte in a preloaded ``model.safetensors``: the next promotion that uses the warm entry notices the
   change, fetches the file again from the store and serves the right bytes.

Both share one module-scoped site (GitOps remote, artifact store, cache volume, MODELCTL_CACHE), so the small model
is quantized once. The kill test runs first: after the second test `local` runs the model, and a repeat there
would be the "already runs" fast skip that starts no server.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from ruamel.yaml import YAML

from pipeline.gitops import init_repo
from pipeline.slot import Slot
from tests.test_promote_cli import EXAMPLE, MODELCTL, ROOT, modelctl, shown

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One site for the module: its GitOps remote, store, cache volume, Prefect home and MODELCTL_CACHE."""
    path = tmp_path_factory.mktemp("faults")
    init_repo(path / "remote.git")
    (path / "prefect-home").mkdir()
    return path


def write_config(site: Path, name: str, model: Path, *, load_gate: bool, envs: tuple[str, ...]) -> Path:
    """The example local config pointed into ``site``; no gate but the load gate (when asked); ``envs`` are copies
    of `local` (their own values file, the same cache root)."""
    yaml = YAML()
    cfg = yaml.load(EXAMPLE.read_text())
    cfg["gitops"]["url"] = str(site / "remote.git")
    cfg["model"]["source"] = str(model)
    cfg["model"]["quantization"]["method"] = "gptq"
    cfg["model"]["quantization"]["calibration"] = {"samples": 16, "max_seq_len": 64}
    cfg["artifacts"]["path"] = str(site / "store")
    local = cfg["environments"]["local"]
    local["cache"]["root"] = str(site / "volume")
    for gate in [g for g in local["gates"] if not (load_gate and g == "load")]:
        del local["gates"][gate]
    if load_gate:
        local["gates"]["load"]["profile"]["duration_s"] = 120  # long enough to be killed in; never reached
    for env in envs:
        if env != "local":
            cfg["environments"][env] = {**local, "values_file": f"envs/{env}/values.yaml"}
    path = site / name
    with path.open("w") as f:
        yaml.dump(cfg, f)
    return path


# --- /proc: the process tree ------------------------------------------------------------------------------------


def proc_table() -> dict[int, tuple[int, str]]:
    """Every live (not zombie) process: pid -> (ppid, start time in clock ticks)."""
    rows = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[-1].split()
        except OSError:
            continue
        if fields[0] not in ("Z", "X"):
            rows[int(stat.parent.name)] = (int(fields[1]), fields[19])
    return rows


def descendants(root: int, rows: dict[int, tuple[int, str]]) -> dict[int, str]:
    """The descendants of ``root`` by ppid links: pid -> start time."""
    found: dict[int, str] = {}
    frontier = {root}
    while frontier:
        frontier = {pid for pid, (ppid, _) in rows.items() if ppid in frontier and pid not in found}
        found.update({pid: rows[pid][1] for pid in frontier})
    return found


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def is_server(command: str) -> bool:
    return "--port" in command and (" serve " in command or "vllm" in command)


def survivors(recorded: dict[int, str]) -> dict[int, str]:
    """The recorded processes still alive as the same process (same start time), with their command lines."""
    rows = proc_table()
    return {pid: cmdline(pid) for pid, start in recorded.items() if pid in rows and rows[pid][1] == start}


def kill_all(recorded: dict[int, str]) -> None:
    for pid in survivors(recorded):
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)


# --- the watchdog alone: a parent killed -9 takes a child that left its session with it ------------------------

PARENT = """
import subprocess, sys, time
from pipeline import processes
processes.watch_descendants(0.1)
child = subprocess.Popen(["sh", "-c", "setsid sleep 300 & wait"])
print(child.pid, flush=True)
time.sleep(300)
"""


def test_the_watchdog_kills_every_descendant_of_a_killed_parent() -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT], env=env, stdout=subprocess.PIPE, text=True, start_new_session=True
    )
    recorded: dict[int, str] = {}
    try:
        assert parent.stdout is not None
        int(parent.stdout.readline())
        deadline = time.monotonic() + 60  # a bound on a poll, not a timing
        while not any(cmdline(pid) == "sleep 300" for pid in recorded):
            assert time.monotonic() < deadline, recorded
            recorded.update(descendants(parent.pid, proc_table()))
            time.sleep(0.05)
        assert len(recorded) >= 3  # the watchdog, sh, and the sleep in its own session
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait()
        left, deadline = survivors(recorded), time.monotonic() + 30
        while left and time.monotonic() < deadline:
            time.sleep(0.05)
            left = survivors(recorded)
        assert not left
    finally:
        if parent.poll() is None:
            os.killpg(parent.pid, signal.SIGKILL)
        parent.wait()
        kill_all(recorded)


# --- 1. kill -9 -------------------------------------------------------------------------------------------------


@pytest.fixture
def promotion(site: Path, tiny_model: Path) -> Iterator[dict[str, Any]]:
    """A `modelctl promote` to `local` with the load gate, in its own process group; killed with everything it
    started (recorded in ``recorded``) when the test ends, whatever happened."""
    write_config(site, "kill.yaml", tiny_model, load_gate=True, envs=("local",))
    env = {**os.environ, "COLUMNS": "100", "PYTHONPATH": str(ROOT)}
    env |= {"PREFECT_HOME": str(site / "prefect-home"), "MODELCTL_CACHE": str(site / "modelctl-cache")}
    for name in ("PREFECT_LOGGING_LEVEL", "TQDM_DISABLE", "MODELCTL_DEBUG", "PREFECT_API_URL"):
        env.pop(name, None)
    out = (site / "kill.out").open("w")
    proc = subprocess.Popen(
        [*MODELCTL, "promote", str(tiny_model), "--env", "local", "-c", "kill.yaml"],
        cwd=site,
        env=env,
        stdout=out,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    state: dict[str, Any] = {"proc": proc, "recorded": {}, "output": site / "kill.out"}
    try:
        yield state
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        kill_all(state["recorded"])
        out.close()


def test_kill_9_leaves_no_process_and_a_free_slot(site: Path, promotion: dict[str, Any]) -> None:
    proc: subprocess.Popen[bytes] = promotion["proc"]
    recorded: dict[int, str] = promotion["recorded"]
    server = None
    deadline = time.monotonic() + 1200  # a bound on a poll for the server (quantizing first), not a timing
    while server is None:
        assert proc.poll() is None, f"ended before its server ran: {promotion['output'].read_text()[-3000:]}"
        assert time.monotonic() < deadline, promotion["output"].read_text()[-3000:]
        recorded.update(descendants(proc.pid, proc_table()))
        server = next((pid for pid in recorded if is_server(cmdline(pid))), None)
        time.sleep(0.2)  # a poll interval, not a timing
    for _ in range(10):  # the server's own children (vLLM's engine and workers) as they appear
        recorded.update(descendants(proc.pid, proc_table()))
        time.sleep(0.2)
    held = Slot("local", site / "modelctl-cache" / "leases").current()
    assert held is not None and held.pid == proc.pid, held  # the run holds the slot while it runs
    started = {pid: cmdline(pid) for pid in survivors(recorded)}

    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()

    left = survivors(recorded)
    deadline = time.monotonic() + 60  # a bound on a poll for the processes to go, not a timing
    while left and time.monotonic() < deadline:
        time.sleep(0.2)
        left = survivors(recorded)
    assert not left, f"survivors of the killed promotion: {left}; it had started {started}"

    env = {**os.environ, "MODELCTL_CACHE": str(site / "modelctl-cache"), "PYTHONPATH": str(ROOT)}
    show = subprocess.run(
        [*MODELCTL, "lease", "show", "--env", "local"], env=env, capture_output=True, text=True, check=False
    )
    assert show.returncode == 0 and "local: free" in show.stdout, show.stdout + show.stderr
    assert show.stdout.strip() == "local: free" or f"its process {proc.pid} is gone" in show.stdout, show.stdout
    slot = Slot("local", site / "modelctl-cache" / "leases")
    lease = slot.acquire("the next promotion")  # taken over from the dead holder, no waiting for its expiry
    assert lease.pid == os.getpid()
    slot.release(lease)


# --- 2. a flipped byte in the warm cache ------------------------------------------------------------------------


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_flipped_byte_in_the_warm_cache_is_fetched_again_not_served(site: Path, tiny_model: Path) -> None:
    write_config(site, "corrupt.yaml", tiny_model, load_gate=False, envs=("local", "staging"))
    first = modelctl(site, "promote", str(tiny_model), "--env", "local", "-c", "corrupt.yaml")
    assert first.returncode == 0, "\n".join(shown(first))
    [weights] = (site / "volume").glob("*/model.safetensors")
    manifest = json.loads((site / "store" / "index" / f"{weights.parent.name}.json").read_text())
    [good] = [f["sha256"] for f in manifest["files"] if f["name"] == "model.safetensors"]
    assert sha256(weights) == good  # the store's manifest: what the cache must hold
    with weights.open("r+b") as f:  # one byte flipped in place: same size, same inode
        f.seek(weights.stat().st_size // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))
    assert sha256(weights) != good

    second = modelctl(site, "promote", str(tiny_model), "--env", "staging", "-c", "corrupt.yaml")
    lines = shown(second)
    assert second.returncode == 0, "\n".join(lines)
    assert sha256(weights) == good, "the flipped byte was served"
    # The preload step ran (not a reused step result) and put the store's bytes back; nothing on the terminal or in
    # the run's log names the repaired file (CacheEntry.repaired is not reported), so only the bytes are asserted.
    assert any(line.startswith("✓ preload") for line in lines), "\n".join(lines)
