"""``python -m sandbox run --dir D``: keep a sandbox running in the foreground until SIGTERM or Ctrl-C.

When it is up it writes ``D/state.json`` (what ``modelctl sandbox up`` waits for and prints) and removes it on the
way out, after every process it started is stopped. ``modelctl sandbox up`` starts this detached, in its own
session; ``modelctl sandbox down`` sends SIGTERM to that session.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from types import FrameType

from .box import LABEL, Sandbox, SandboxSettings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sandbox", description=LABEL)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a sandbox in the foreground until SIGTERM")
    run.add_argument("--dir", type=Path, required=True, help="where the sandbox keeps its state, logs and volumes")
    run.add_argument("--gitops", type=Path, default=None, help="the bare GitOps repo (default DIR/gitops.git)")
    run.add_argument("--traffic", type=float, default=1.0, help="user requests per second (0: none)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    state_file = args.dir / "state.json"
    sandbox = Sandbox(SandboxSettings(workdir=args.dir, gitops=args.gitops, traffic_rps=args.traffic))
    try:
        sandbox.start()
        state = {"pid": os.getpid(), **sandbox.state()}
        tmp = state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=2), encoding="utf-8")
        tmp.replace(state_file)
        print(LABEL, flush=True)
        print(json.dumps(state, indent=2), flush=True)
        while not stop.wait(1.0):
            pass
    finally:
        state_file.unlink(missing_ok=True)
        sandbox.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
