"""The cache volume's space budget: what a preload still has to write, reserved so two can't both pass the check.

Each running preload leaves ``<root>/.reservations/<entry id>.<pid>.json`` naming its target and files. A new
preload checks, under one lock for the whole volume, that the free space covers what it still needs *plus* what
every other live preload still has to write (recomputed from their files on disk, so progress frees the budget).
A reservation whose process is gone is ignored and removed. Sizes are shown in human units with enough precision
that a shortfall never reads "0.00 GiB".
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from pipeline.errors import TerminalError
from pipeline.slot import process_start

PARTIAL = ".partial"


def human(size: float) -> str:
    """``size`` bytes in binary units with three significant digits: 812 B, 1.50 MiB, 12.3 GiB."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(size) < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.3g} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def free_bytes(root: Path) -> int:
    """Free bytes on the volume holding ``root`` (a seam tests replace)."""
    return shutil.disk_usage(root).free


def still_to_write(target: Path, files: Sequence[tuple[str, int]]) -> int:
    """Bytes still to write into ``target`` for ``files`` (name, size), counting finished and partial files."""
    needed = 0
    for name, size in files:
        dest = target / name
        partial = dest.with_name(dest.name + PARTIAL)
        have = sum(p.stat().st_size for p in (dest, partial) if p.exists())
        needed += max(0, size - have)
    return needed


def _others(folder: Path, mine: Path) -> list[tuple[str, int]]:
    """(entry id, bytes still to write) of every other live preload; removes the reservations of dead ones."""
    found = []
    for path in folder.glob("*.json"):
        try:
            held = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if path == mine:
            continue
        if process_start(int(held.get("pid", 0))) != held.get("start"):
            path.unlink(missing_ok=True)
            continue
        found.append((str(held["entry"]), still_to_write(Path(held["target"]), [tuple(f) for f in held["files"]])))
    return found


@contextmanager
def reserve(root: Path, entry_id: str, target: Path, files: Sequence[tuple[str, int]], margin: int) -> Iterator[int]:
    """Check the free space and hold a reservation for ``files`` while the block writes them; yields the need.

    Raises:
        TerminalError: free space minus other live preloads' reservations cannot hold what this one still needs.
    """
    folder = root / ".reservations"
    folder.mkdir(parents=True, exist_ok=True)
    mine = folder / f"{entry_id}.{os.getpid()}.json"
    with open(folder / ".lock", "a") as guard:
        fcntl.flock(guard, fcntl.LOCK_EX)  # check and reserve in one step for the whole volume
        needed, others, free = still_to_write(target, files), _others(folder, mine), free_bytes(root)
        reserved = sum(size for _, size in others)
        if needed + reserved + margin > free:
            by = "; ".join(f"{name} still writing {human(size)}" for name, size in others if size)
            raise TerminalError(
                f"the cache volume at {root} has {human(free)} free, but {entry_id} needs {human(needed)} more "
                f"(plus {human(margin)} headroom)"
                + (f", and running preloads hold {human(reserved)} ({by})" if by else ""),
                hint="free space on the cache volume (remove unused artifacts), enlarge the PVC, or wait for the "
                "running preloads to finish",
            )
        mine.write_text(json.dumps({"entry": entry_id, "pid": os.getpid(), "start": process_start(os.getpid()),
                                    "target": str(target), "files": [list(f) for f in files]}))  # fmt: skip
    try:
        yield needed
    finally:
        mine.unlink(missing_ok=True)
