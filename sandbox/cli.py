"""`modelctl sandbox up | down | status`: start, stop and look at the SIMULATED cluster.

``up`` starts ``python -m sandbox run`` detached (its own session, its output in ``DIR/sandbox.log``), waits for
``DIR/state.json`` (kubeconfig, promotion.yaml, Prometheus, Services) and prints it, labelled as simulated. ``down``
ends the process group and every process the sandbox started (its pods run in sessions of their own), and checks
that none is left. ``status`` reads Applications, Rollouts and Pods through the kubeconfig with the official
client, as ``kubectl get`` would. Only typer and the standard library load at import (``modelctl --help`` stays
fast); the rest loads when a command runs.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer

SIMULATED = (
    "SIMULATED cluster: the API server and the Argo CD / Argo Rollouts controllers are simulated; "
    "the pods (vLLM processes), Services and Prometheus are real"
)
STATE, LOG, PIDFILE = "state.json", "sandbox.log", "sandbox.pid"
TAIL_LINES = 25

sandbox_app = typer.Typer(help="The SIMULATED cluster: up, down, status.", no_args_is_help=True)
DirOption = Annotated[Path, typer.Option("--dir", help="the sandbox's folder (state, log, GitOps repo)")]
DEFAULT_DIR = Path("demo-output/sandbox")
# pipeline.cli registers this module's app while it loads: its render helpers are imported inside the commands.
JsonFlag = Annotated[bool, typer.Option("--json", help="Print one JSON object instead of tables.")]


def register(app: typer.Typer) -> None:
    app.add_typer(sandbox_app, name="sandbox")


def run_command(directory: Path, gitops: Path, traffic: float) -> list[str]:
    """The command `up` starts (tests replace it with a stand-in)."""
    where = ["--dir", str(directory), "--gitops", str(gitops), "--traffic", f"{traffic:g}"]
    return [sys.executable, "-m", "sandbox", "run", *where]


# processes ------------------------------------------------------------------------------------------------------
def _table() -> dict[int, tuple[int, int, str]]:
    """Every live (not zombie) process: pid -> (ppid, pgid, start time), from /proc."""
    rows: dict[int, tuple[int, int, str]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[-1].split()
        except OSError:
            continue
        if fields[0] not in ("Z", "X"):
            rows[int(stat.parent.name)] = (int(fields[1]), int(fields[2]), fields[19])
    return rows


def family(root: int, known: dict[int, str] | None = None) -> dict[int, str]:
    """``root``, its process group and its descendants (pid -> start time), plus the still-live ``known`` ones:
    the pods a sandbox started leave its group and, once it is gone, its tree."""
    rows = _table()
    found = {p: s for p, s in (known or {}).items() if p in rows and rows[p][2] == s}
    if root in rows:
        found[root] = rows[root][2]
    found.update({p: row[2] for p, row in rows.items() if row[1] == root})
    grew = True
    while grew:
        grew = False
        for pid, (ppid, _, start) in rows.items():
            if ppid in found and pid not in found and pid != os.getpid():
                found[pid], grew = start, True
    return found


def alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie child of ours is reaped and counts as gone)."""
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)
    return pid in _table()


def stop_family(root: int, grace_s: float = 20.0) -> list[int]:
    """SIGTERM ``root``'s process group (the sandbox closes its pods itself), wait up to ``grace_s``, then SIGKILL
    the group and every process of its family still alive. Returns the pids still alive after that (none)."""
    known = family(root)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(root, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        alive(root)
        known = family(root, known)
        if not known:
            return []
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(root, signal.SIGKILL)
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline:
        known = family(root, known)
        for pid in known:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        alive(root)
        if not family(root, known):
            return []
        time.sleep(0.1)
    return sorted(family(root, known))


# state ----------------------------------------------------------------------------------------------------------
def read_state(directory: Path) -> dict[str, Any] | None:
    """The running sandbox's state.json, or None (absent, or not written completely yet)."""
    try:
        data = json.loads((directory / STATE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def running_pid(directory: Path) -> int | None:
    """The pid of the sandbox that runs (or starts) in ``directory``, or None. A pid counts only while its command
    line names ``directory`` (`up` passes it): a stale pid the system gave to another process is never signalled."""
    for pid in ((read_state(directory) or {}).get("pid"), _pidfile(directory)):
        if isinstance(pid, int) and pid > 0 and alive(pid) and _started_for(pid, directory):
            return pid
    return None


def _started_for(pid: int, directory: Path) -> bool:
    try:
        args = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return not Path("/proc/self/cmdline").exists()  # no /proc here: trust the pid
    return str(directory.resolve()) in args


def _pidfile(directory: Path) -> int | None:
    try:
        return int((directory / PIDFILE).read_text().strip())
    except (OSError, ValueError):
        return None


def log_tail(log: Path, lines: int = TAIL_LINES) -> str:
    try:
        text = log.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:]) or "(the log is empty)"


def _clear(directory: Path) -> None:
    for name in (STATE, PIDFILE):
        (directory / name).unlink(missing_ok=True)


def start(directory: Path, gitops: Path | None, traffic: float, timeout_s: float) -> dict[str, Any]:
    """Start the sandbox in ``directory`` and wait until it is ready; its state.json.

    Raises:
        TerminalError: one already runs there, or it exited before it was ready (its log's tail named).
        TransientError: not ready within ``timeout_s`` (it was stopped).
    """
    from pipeline.errors import TerminalError, TransientError

    directory = directory.resolve()
    directory.mkdir(parents=True, exist_ok=True)
    pid = running_pid(directory)
    if pid is not None:
        raise TerminalError(
            f"a sandbox already runs in {directory} (pid {pid})",
            hint=f"use it (`modelctl sandbox status --dir {directory}`), or stop it first: "
            f"`modelctl sandbox down --dir {directory}`",
        )
    _clear(directory)  # a stale state of a sandbox that is gone
    remote = (gitops or directory / "gitops.git").resolve()
    if not remote.exists():
        from pipeline.gitops import init_repo

        init_repo(remote)
    log = directory / LOG
    with log.open("wb") as sink:
        proc = subprocess.Popen(
            run_command(directory, remote, traffic),
            stdin=subprocess.DEVNULL,
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    (directory / PIDFILE).write_text(f"{proc.pid}\n")
    deadline = time.monotonic() + timeout_s
    while True:
        state = read_state(directory)
        if state is not None and state.get("pid") == proc.pid:
            return state
        code = proc.poll()
        if code is not None or time.monotonic() > deadline:
            stop_family(proc.pid, grace_s=5.0)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(5)
            _clear(directory)
            tail = log_tail(log)
            if code is not None:
                raise TerminalError(
                    f"the sandbox exited with code {code} before it was ready; the end of {log}:\n{tail}",
                    hint="fix what the log names, then `modelctl sandbox up` again",
                )
            raise TransientError(
                f"the sandbox was not ready within {timeout_s:g}s (no {STATE}); it was stopped. "
                f"The end of {log}:\n{tail}",
                hint="raise --timeout on a busy machine, or read the log",
            )
        time.sleep(0.2)


def stop(directory: Path, grace_s: float = 20.0) -> int | None:
    """Stop the sandbox of ``directory``; the pid that was stopped, or None when none ran.

    Raises:
        TerminalError: processes of it are still alive after SIGKILL (their pids named).
    """
    from pipeline.errors import TerminalError

    directory = directory.resolve()
    pid = running_pid(directory)
    if pid is not None:
        left = stop_family(pid, grace_s)
        if left:
            raise TerminalError(
                f"processes of the sandbox {pid} are still alive after SIGKILL: {left}",
                hint=f"look at them (`ps -o pid,stat,cmd -p {','.join(map(str, left))}`) and end them by hand",
            )
    _clear(directory)
    return pid


# commands -------------------------------------------------------------------------------------------------------
def _print_state(state: dict[str, Any], directory: Path) -> None:
    from pipeline.cli.render import out

    out.print(f"[bold yellow]{SIMULATED}[/]", highlight=False)
    out.print(f"  pid         {state.get('pid')} (log: {directory.resolve() / LOG})", highlight=False)
    out.print(f"  kubeconfig  {state.get('kubeconfig')} (the pipeline's identity)", highlight=False)
    if state.get("admin_kubeconfig"):
        out.print(f"  admin       {state['admin_kubeconfig']} (for looking around, like kubectl)", highlight=False)
    out.print(f"  config      {state.get('config')}", highlight=False)
    out.print(f"  prometheus  {state.get('prometheus_url')}", highlight=False)
    services = state.get("services") or {}
    for i, (name, url) in enumerate(sorted(services.items())):
        out.print(f"  {'services' if i == 0 else '':<10}  {name:<40} {url}", highlight=False)
    out.print(
        f"  use it      KUBECONFIG={state.get('kubeconfig')} modelctl promote ... -c {state.get('config')}; "
        f"stop it with `modelctl sandbox down --dir {directory}`",
        highlight=False,
    )


@sandbox_app.command("up")
def up(
    directory: DirOption = DEFAULT_DIR,
    gitops: Annotated[
        Path | None, typer.Option(help="the GitOps repo (default: DIR/gitops.git, created from the template)")
    ] = None,
    traffic: Annotated[float, typer.Option(help="user requests per second through the users' Service")] = 1.0,
    timeout: Annotated[float, typer.Option(help="seconds to wait until the sandbox is ready")] = 120.0,
    as_json: JsonFlag = False,
) -> None:
    """Start the SIMULATED cluster in the background and print how to reach it (kubeconfig, config, Services)."""
    from pipeline.cli.render import emit_json, errors

    with errors(as_json):
        state = start(directory, gitops, traffic, timeout)
    if as_json:
        emit_json(state)
        return
    _print_state(state, directory)


@sandbox_app.command("down")
def down(directory: DirOption = DEFAULT_DIR, as_json: JsonFlag = False) -> None:
    """Stop the sandbox: SIGTERM, SIGKILL after ~20 s, and check that none of its processes is left."""
    from pipeline.cli.render import emit_json, errors, out

    with errors(as_json):
        pid = stop(directory)
    if as_json:
        emit_json({"ok": True, "stopped": pid})
    elif pid is None:
        out.print(f"[yellow]=[/] no sandbox runs in {directory}; nothing to stop", highlight=False)
    else:
        out.print(f"[green]✓[/] stopped the SIMULATED sandbox (pid {pid}); none of its processes is left")


@sandbox_app.command("status")
def status(directory: DirOption = DEFAULT_DIR, as_json: JsonFlag = False) -> None:
    """Applications, Rollouts and Pods of the running sandbox, read through its kubeconfig (like `kubectl get`)."""
    from pipeline.cli.render import emit_json, errors, fit_table, out
    from pipeline.errors import TerminalError
    from sandbox.cli_view import cluster_view, named_in

    with errors(as_json):
        state = read_state(directory)
        if state is None or running_pid(directory) is None:
            raise TerminalError(
                f"no sandbox runs in {directory}", hint=f"start one: `modelctl sandbox up --dir {directory}`"
            )
        kubeconfig = Path(str(state.get("admin_kubeconfig") or state["kubeconfig"]))  # admin's: may list everything
        view = cluster_view(kubeconfig, named_in(Path(str(state.get("config") or ""))))
    if as_json:
        emit_json({"ok": True, "simulated": True, "state": state, **view})
        return
    out.print(f"[bold yellow]{SIMULATED}[/]", highlight=False)
    for title, rows in view.items():
        out.print(f"\n[bold]{title}[/]")
        if rows is None:
            out.print(f"  (the kubeconfig's identity may not read {title})")
            continue
        if not rows:
            out.print("  (none)")
            continue
        headers = list(rows[0])
        out.print(fit_table(headers, [[str(r[h]) for h in headers] for r in rows], {}))


@sandbox_app.command("check")
def check(directory: DirOption = DEFAULT_DIR, as_json: JsonFlag = False) -> None:
    """Do Git and the cluster agree? For each environment of the sandbox's config: the branch head synced and
    Healthy, the Rollout settled on the artifact Git names, every Ready pod on it. Exits 2 when they disagree."""
    from pipeline.cli.render import emit_json, errors, out
    from pipeline.config import load_config
    from pipeline.errors import TerminalError
    from sandbox.agreement import check as agreement

    with errors(as_json):
        state = read_state(directory)
        if state is None or running_pid(directory) is None:
            raise TerminalError(
                f"no sandbox runs in {directory}", hint=f"start one: `modelctl sandbox up --dir {directory}`"
            )
        cfg = load_config(str(state["config"]))
        kubeconfig = Path(str(state.get("admin_kubeconfig") or state["kubeconfig"]))
        results = []
        for name, env in cfg.environments.items():
            if env.argocd is None or env.rollout is None:
                continue
            results.append(
                agreement(
                    kubeconfig,
                    Path(str(state["gitops"])),
                    name,
                    env.values_file,
                    env.argocd.application,
                    env.rollout.namespace,
                    env.rollout.name,
                    cfg.gitops.branch,
                )
            )
        if as_json:
            emit_json({"ok": all(r.agree for r in results), "environments": [r.__dict__ for r in results]})
        else:
            for result in results:
                out.print(("[green]✓[/] " if result.agree else "[red]✗[/] ") + result.summary(), highlight=False)
        disagree = [r.env for r in results if not r.agree]
        if disagree and not as_json:
            raise TerminalError(
                f"Git and the cluster disagree for {', '.join(disagree)}",
                hint="see above; `modelctl sandbox status` shows the cluster's side",
            )
    if as_json and any(not r.agree for r in results):
        raise typer.Exit(2)
