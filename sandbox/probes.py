"""Container probes run for real, each in its own thread: httpGet or tcpSocket against the pod's host port, or exec
locally (grpc probes are not emulated: they pass).

A :class:`Prober` follows Kubernetes' rules for one probe of one container: first check after
``initialDelaySeconds``, then every ``periodSeconds`` (real time), each bounded by ``timeoutSeconds``; the result
flips to failure after ``failureThreshold`` consecutive failures and to success after ``successThreshold``
consecutive successes. The kubelet reads :attr:`Prober.succeeded` / :attr:`Prober.failed` on its tick.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import threading
import urllib.error
import urllib.request
from collections.abc import Callable

from .store import Obj

Check = Callable[[float], bool]  # one probe attempt with a timeout in seconds: passed?


def http_check(port: int, path: str, scheme: str = "HTTP") -> Check:
    """A GET to 127.0.0.1:port/path; 200-399 pass, as the kubelet's httpGet."""
    url = f"{scheme.lower()}://127.0.0.1:{port}/{path.lstrip('/')}"

    def check(timeout_s: float) -> bool:
        try:
            with urllib.request.urlopen(url, timeout=timeout_s) as response:
                return 200 <= int(response.status) < 400
        except urllib.error.HTTPError as exc:
            return 200 <= exc.code < 400
        except (OSError, ValueError):
            return False

    return check


def tcp_check(port: int) -> Check:
    """A TCP connect to 127.0.0.1:port; an accepted connection passes, as the kubelet's tcpSocket."""

    def check(timeout_s: float) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=timeout_s):
                return True
        except OSError:
            return False

    return check


def exec_check(argv: list[str], env: dict[str, str], cwd: str) -> Check:
    """A command run in its own process group (killed at the timeout); exit status 0 passes."""

    def check(timeout_s: float) -> bool:
        try:
            proc = subprocess.Popen(
                argv,
                env=env,
                cwd=cwd,
                start_new_session=True,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        except OSError:
            return False
        try:
            return proc.wait(timeout_s) == 0
        except subprocess.TimeoutExpired:
            return False
        finally:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    return check


class Prober(threading.Thread):
    """One probe of one running container, checked periodically until :meth:`stop`."""

    def __init__(self, kind: str, spec: Obj, check: Check) -> None:
        super().__init__(name=f"probe-{kind}", daemon=True)
        self.kind = kind
        self.check = check
        self.initial_delay_s = float(spec.get("initialDelaySeconds", 0))
        self.period_s = float(spec.get("periodSeconds", 10))
        self.timeout_s = float(spec.get("timeoutSeconds", 1))
        self.failure_threshold = int(spec.get("failureThreshold", 3))
        self.success_threshold = int(spec.get("successThreshold", 1))
        self.succeeded = False  # the last verdict was success
        self.failed = False  # failureThreshold consecutive failures were seen
        self.ever_succeeded = False
        self._halt = threading.Event()

    def stop(self) -> None:
        self._halt.set()

    def run(self) -> None:
        if self._halt.wait(self.initial_delay_s):
            return
        successes = failures = 0
        while not self._halt.is_set():
            passed = self.check(self.timeout_s)
            if self._halt.is_set():
                return
            if passed:
                successes, failures = successes + 1, 0
                if successes >= self.success_threshold:
                    self.succeeded, self.failed, self.ever_succeeded = True, False, True
            else:
                successes, failures = 0, failures + 1
                if failures >= self.failure_threshold:
                    self.succeeded, self.failed = False, True
            if self._halt.wait(self.period_s):
                return
