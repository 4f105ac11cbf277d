"""Services as kube-proxy makes them work, on 127.0.0.1: one TCP proxy per Service, to the Ready pods it selects.

Each Service of the store gets a listener on 127.0.0.1 (a port the sandbox pre-assigned, else an ephemeral one,
recorded in the Service's annotation ``HOST_PORT``). Every accepted connection is sent to one backend: the Ready
pods of the Service's namespace whose labels match ``spec.selector`` (read again for each connection, since Argo
Rollouts re-pins the canary and stable Services' selectors), at the ``targetPort`` of the Service's first port.
Backends are taken in turn per connection (IPVS's round robin; iptables picks at random), so a users' Service over
one stable and one canary pod sends each about half of the connections. With no Ready backend the connection is
reset at once, as kube-proxy's REJECT rule refuses it. Bytes are copied both ways as they arrive (no buffering, so
server-sent events stream), and a half-close on one side is passed on to the other.
"""

from __future__ import annotations

import contextlib
import itertools
import selectors
import socket
import struct
import threading
from collections.abc import Callable

from .pods import POD_IP, host_port, is_ready, selects
from .store import BY_KIND, ApiError, Obj, Store

SERVICE = BY_KIND["Service"]
POD = BY_KIND["Pod"]
HOST_PORT = "sandbox.modelctl.io/host-port"
Key = tuple[str, str]  # namespace, name
_CHUNK = 65536


def _reset(sock: socket.socket) -> None:
    """Close with a TCP reset (SO_LINGER 0): the client sees a connection error, not an empty answer."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def backends(store: Store, namespace: str, name: str) -> list[int]:
    """Host ports of the Ready pods the Service selects now, in pod-name order ([] when the Service is gone)."""
    try:
        service = store.get(SERVICE, namespace, name)
    except ApiError:
        return []
    spec = service.get("spec") or {}
    ports = spec.get("ports") or []
    if not ports:
        return []
    target = ports[0].get("targetPort", ports[0].get("port"))
    if target is None:
        return []
    pods, _ = store.list(POD, namespace)
    found = []
    for pod in pods:
        if is_ready(pod) and selects(spec.get("selector"), pod["metadata"].get("labels")):
            port = host_port(pod, target)
            if port is not None:
                found.append(port)
    return found


class _Connection:
    """One client connection spliced to one backend, in its own thread."""

    def __init__(self, client: socket.socket, backend: socket.socket, wake: socket.socket) -> None:
        self.client, self.backend, self.wake = client, backend, wake

    def run(self) -> None:
        peers = {self.client: self.backend, self.backend: self.client}
        open_reads = {self.client, self.backend}
        with selectors.DefaultSelector() as selector:
            for sock in open_reads:
                selector.register(sock, selectors.EVENT_READ)
            selector.register(self.wake, selectors.EVENT_READ)
            try:
                while open_reads:
                    for key, _ in selector.select():
                        if key.fileobj is self.wake:
                            return
                        source = key.fileobj
                        assert isinstance(source, socket.socket)
                        data = source.recv(_CHUNK)
                        if data:
                            peers[source].sendall(data)
                            continue
                        # end of stream from one side: pass the half-close on, keep the other direction open
                        selector.unregister(source)
                        open_reads.discard(source)
                        with contextlib.suppress(OSError):
                            peers[source].shutdown(socket.SHUT_WR)
            except OSError:
                pass  # reset by either side, or shut down by close()
            finally:
                for sock in (self.client, self.backend):
                    sock.close()


class _Listener:
    """The listening socket of one Service and its accept thread."""

    def __init__(self, key: Key, port: int, pick: Callable[[Key], int | None], wake: socket.socket) -> None:
        self.key, self.pick, self.wake = key, pick, wake
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self.sock.bind((POD_IP, port))
        except OSError as exc:
            self.sock.close()
            raise OSError(
                f"the sandbox cannot listen for Service {key[0]}/{key[1]} on {POD_IP}:{port}: {exc.strerror}; "
                "stop what uses that port or configure another one"
            ) from None
        self.sock.listen(128)
        self.port: int = self.sock.getsockname()[1]
        self.closed = threading.Event()
        self.connections: dict[_Connection, threading.Thread] = {}
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self._accept, name=f"svc-{key[0]}-{key[1]}", daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        try:
            with selectors.DefaultSelector() as selector:
                selector.register(self.sock, selectors.EVENT_READ)
                selector.register(self.wake, selectors.EVENT_READ)
                while not self.closed.is_set():
                    for key, _ in selector.select():
                        if key.fileobj is self.wake or self.closed.is_set():
                            return
                        try:
                            client, _ = self.sock.accept()
                        except OSError:
                            continue
                        self._serve(client)
        finally:
            self.sock.close()

    def _serve(self, client: socket.socket) -> None:
        port = self.pick(self.key)
        if port is None:
            _reset(client)
            return
        backend = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            backend.settimeout(5)
            backend.connect((POD_IP, port))
            backend.settimeout(None)
        except OSError:
            backend.close()
            _reset(client)  # the chosen pod refused: the client sees the error, as with kube-proxy
            return
        for sock in (client, backend):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        connection = _Connection(client, backend, self.wake)
        thread = threading.Thread(target=self._run, args=(connection,), name=f"svc-conn-{self.key[1]}", daemon=True)
        with self.lock:
            self.connections[connection] = thread
        thread.start()

    def _run(self, connection: _Connection) -> None:
        try:
            connection.run()
        finally:
            with self.lock:
                self.connections.pop(connection, None)

    def close(self) -> None:
        """Stop accepting (the accept thread closes the socket); open connections end on their own."""
        self.closed.set()
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes the accept thread's select on Linux

    def abort(self) -> list[threading.Thread]:
        """Shut every open connection down; the threads to join."""
        with self.lock:
            connections = dict(self.connections)
        for connection in connections:
            for sock in (connection.client, connection.backend):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
        return [self.thread, *connections.values()]


class ServiceProxies:
    """A TCP proxy per Service of ``store`` on 127.0.0.1; :meth:`tick` follows Services being added and deleted.

    ``ports`` pre-assigns host ports to (namespace, name): those are listened on from the start, before the Service
    exists, and stay open (with no backends) if it is deleted, so clients configured with them keep working.
    """

    def __init__(self, store: Store, ports: dict[tuple[str, str], int] | None = None) -> None:
        self.store = store
        self.fixed = dict(ports or {})
        self._wake_read, self._wake_write = socket.socketpair()
        self._listeners: dict[Key, _Listener] = {}
        self._retired: list[_Listener] = []
        self._turns: dict[Key, itertools.count[int]] = {}
        self._lock = threading.Lock()  # the round-robin counters (connection threads)
        self._state = threading.Lock()  # listeners (tick and close)
        self._closed = False
        try:
            for key, port in self.fixed.items():
                self._listeners[key] = _Listener(key, port, self._pick, self._wake_read)
        except OSError:
            self.close()
            raise

    def _pick(self, key: Key) -> int | None:
        """The next backend of the Service, round robin over the current ones; None when it has none."""
        found = backends(self.store, *key)
        if not found:
            return None
        with self._lock:
            turn = next(self._turns.setdefault(key, itertools.count()))
        return found[turn % len(found)]

    def tick(self) -> None:
        """Listen for new Services, record their host port, stop listening for deleted ones."""
        with self._state:
            if not self._closed:
                self._tick()

    def _tick(self) -> None:
        self._retired = [r for r in self._retired if r.connections or r.thread.is_alive()]
        services, _ = self.store.list(SERVICE, None)
        present = {(s["metadata"]["namespace"], s["metadata"]["name"]): s for s in services}
        for key, service in present.items():
            listener = self._listeners.get(key)
            if listener is None:
                listener = self._listeners[key] = _Listener(key, 0, self._pick, self._wake_read)
            annotations = service["metadata"].get("annotations") or {}
            if annotations.get(HOST_PORT) != str(listener.port):
                self._annotate(key, listener.port)
        for key in [k for k in self._listeners if k not in present and k not in self.fixed]:
            listener = self._listeners.pop(key)
            listener.close()
            self._retired.append(listener)  # its open connections still run until they end or close()
            self._turns.pop(key, None)

    def _annotate(self, key: Key, port: int) -> None:
        def change(obj: Obj) -> None:
            obj["metadata"].setdefault("annotations", {})[HOST_PORT] = str(port)

        with contextlib.suppress(ApiError):  # deleted meanwhile: the next tick closes the listener
            self.store.update(SERVICE, key[0], key[1], change)

    def port(self, namespace: str, name: str) -> int:
        """The host port of a Service (pre-assigned, or listened on since a tick saw it)."""
        listener = self._listeners.get((namespace, name))
        if listener is None:
            raise LookupError(
                f"the sandbox has no proxy for Service {namespace}/{name}: it does not exist (yet), or no tick ran "
                "since it was created"
            )
        return listener.port

    def url(self, namespace: str, name: str) -> str:
        return f"http://{POD_IP}:{self.port(namespace, name)}"

    def close(self) -> None:
        """Stop every listener and connection (idempotent); their threads end within moments."""
        with self._state:
            if self._closed:
                return
            self._closed = True
        with contextlib.suppress(OSError):  # never read: every selector watching it returns from now on
            self._wake_write.send(b"x")
        listeners = [*self._listeners.values(), *self._retired]
        self._listeners.clear()
        threads = []
        for listener in listeners:
            listener.close()
            threads += listener.abort()
        for thread in threads:
            thread.join(timeout=5)
        self._wake_write.close()
        self._wake_read.close()
