"""Progress: the one callback every long step reports through (what it is doing, and how far, 0..1)."""

from __future__ import annotations

from typing import Protocol


class Progress(Protocol):
    """Called as work advances: ``progress("hashing the artifact", 0.95)``; must return quickly."""

    def __call__(self, what: str, fraction: float, /) -> None: ...
