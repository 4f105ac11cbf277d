"""A fake Kubernetes API server on 127.0.0.1, in a thread, that the official ``kubernetes`` client talks to.

Routes (namespaced and cluster-wide lists):
    /api/v1/[namespaces/{ns}/]{plural}[/{name}[/{status|log}]]
    /apis/{group}/{version}/[namespaces/{ns}/]{plural}[/{name}[/status]]
GET (get, list, ``?watch=true``), POST (create, 201), PUT (replace), PATCH (merge or JSON patch), DELETE.

Every request is authenticated (a bearer token from :attr:`FakeApiServer.tokens`: 401 without one) and authorized
with Kubernetes RBAC from the Roles, ClusterRoles and bindings in the store (403 with the real server's message;
see rbac.py), before anything else. Faults: :meth:`FakeApiServer.fail` makes chosen calls answer an error code,
hang past the client's timeout, or (watches) end early, a given number of times. Every request is recorded in
``requests`` (with who sent it and what the authorizer saw) so tests can check exactly what a client sent.
"""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Literal
from urllib.parse import parse_qs, urlsplit

from . import rbac
from .store import BY_PATH, ApiError, Obj, Resource, Store, dumps, matches_fields, matches_labels

Verb = Literal["get", "list", "watch", "create", "update", "patch", "delete"]
FaultMode = Literal["error", "hang", "drop"]


@dataclass
class Fault:
    """Make matching requests fail ``times`` times: an error answer, a hang, or (watch) a stream that ends."""

    verb: Verb
    plural: str
    name: str | None = None
    subresource: str | None = None
    mode: FaultMode = "error"
    code: int = 500
    times: int = 1
    after_events: int = 0  # drop: how many events to send before ending the stream
    message: str | None = None  # the error message (default: "injected fault (<code>)")
    hits: int = 0

    def matches(self, verb: str, plural: str, name: str | None, subresource: str | None) -> bool:
        return (
            self.times > 0
            and self.verb == verb
            and self.plural == plural
            and (self.name is None or self.name == name)
            and self.subresource == subresource
        )


@dataclass(frozen=True)
class Request:
    """What a client sent (bodies parsed from JSON)."""

    verb: str
    path: str
    query: dict[str, str]
    content_type: str
    body: Any
    user: str = ""
    attrs: rbac.Attributes | None = None  # what RBAC decided on
    allowed: bool = True


@dataclass
class Route:
    resource: Resource
    namespace: str | None
    name: str | None
    subresource: str | None
    query: dict[str, str] = field(default_factory=dict)

    @property
    def verb(self) -> str:
        return "watch" if self.query.get("watch") in ("true", "1") else "get"


def parse_route(path: str, query: dict[str, str]) -> Route:
    """Split an API path into kind, namespace, name and subresource."""
    parts = [p for p in path.split("/") if p]
    if parts[:2] == ["api", "v1"]:
        group, version, rest = "", "v1", parts[2:]
    elif len(parts) >= 3 and parts[0] == "apis":
        group, version, rest = parts[1], parts[2], parts[3:]
    else:
        raise ApiError(404, "NotFound", f"the server could not find the requested resource ({path})")
    namespace = None
    if len(rest) >= 2 and rest[0] == "namespaces" and (len(rest) > 2 or (group, version, rest[0]) not in BY_PATH):
        namespace, rest = rest[1], rest[2:]
    if not rest or (group, version, rest[0]) not in BY_PATH:
        raise ApiError(404, "NotFound", f"the server could not find the requested resource ({path})")
    resource = BY_PATH[(group, version, rest[0])]
    name = rest[1] if len(rest) > 1 else None
    sub = rest[2] if len(rest) > 2 else None
    return Route(resource, namespace, name, sub, query)


class FakeApiServer:
    """The server: ``start()`` it, point a client at ``url``, ``stop()`` it. Thread-safe."""

    def __init__(self, store: Store | None = None) -> None:
        self.store = store or Store()
        self.faults: list[Fault] = []
        self.requests: list[Request] = []
        self.pod_logs: dict[tuple[str, str], str] = {}
        # the kubelet's logs: (namespace, pod, container or None) -> text, or None for a pod it does not run
        self.log_provider: Callable[[str, str, str | None], str | None] | None = None
        self.tokens = rbac.Tokens()
        self.admin_token = self.tokens.issue(rbac.ADMIN)
        self.session_record = True  # add non-admin requests to rbac.SESSION_USES (off once a test edits RBAC)
        self.stopping = threading.Event()
        self._lock = threading.Lock()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        assert self._httpd is not None, "start() the server first"
        host, port = self._httpd.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> FakeApiServer:
        handler = type("Handler", (_Handler,), {"api": self})
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, args=(0.05,), name="fake-apiserver", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self.stopping.set()
        with self.store.changed:
            self.store.changed.notify_all()
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()

    def fail(self, verb: Verb, plural: str, **kwargs: Any) -> Fault:
        """Inject a fault, e.g. ``fail("patch", "rollouts", subresource="status", code=500, times=2)``."""
        fault = Fault(verb, plural, **kwargs)
        with self._lock:
            self.faults.append(fault)
        return fault

    def take_fault(self, verb: str, route: Route) -> Fault | None:
        with self._lock:
            for fault in self.faults:
                if fault.matches(verb, route.resource.plural, route.name, route.subresource):
                    fault.times -= 1
                    fault.hits += 1
                    return fault
        return None

    def sent(self, verb: str, path_contains: str = "") -> list[Request]:
        """The recorded requests of one verb whose path contains ``path_contains``."""
        with self._lock:
            return [r for r in self.requests if r.verb == verb and path_contains in r.path]

    def token(self, who: rbac.Identity) -> str:
        """A bearer token for ``who`` (a ServiceAccount's must exist in the store when it is used)."""
        return self.tokens.issue(who)

    def uses(self, user: str) -> list[rbac.Attributes]:
        """What ``user`` asked for, as the authorizer saw it."""
        with self._lock:
            return [r.attrs for r in self.requests if r.user == user and r.attrs is not None]

    def set_pod_log(self, namespace: str, pod: str, text: str) -> None:
        self.pod_logs[(namespace, pod)] = text


class _Handler(BaseHTTPRequestHandler):
    api: FakeApiServer
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body go out as separate writes: no 40 ms delayed-ACK stalls

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def do_GET(self) -> None:
        self._serve("GET")

    def do_POST(self) -> None:
        self._serve("POST")

    def do_PUT(self) -> None:
        self._serve("PUT")

    def do_PATCH(self) -> None:
        self._serve("PATCH")

    def do_DELETE(self) -> None:
        self._serve("DELETE")

    # plumbing ------------------------------------------------------------------------------------------------
    def _send(self, code: int, payload: Any, content_type: str = "application/json") -> None:
        data = payload if isinstance(payload, bytes) else dumps(payload)
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _serve(self, method: str) -> None:
        split = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(split.query).items()}
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        content_type = self.headers.get("Content-Type", "")
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            self._send(400, ApiError(400, "BadRequest", "the body is not JSON").status())
            return
        try:
            who = self.api.tokens.identify(self.headers.get("Authorization"), self.api.store)
            found = rbac.path_attributes(split.path, method, query)
            if found is None:
                raise ApiError(404, "NotFound", f"the server could not find the requested resource ({split.path})")
            attrs, named = found
            verb = {"POST": "create", "PUT": "update", "PATCH": "patch", "DELETE": "delete"}.get(method)
            verb = verb or ("watch" if attrs.verb == "watch" and not named else "get")  # the names faults use
            allowed = rbac.authorize(self.api.store, who, attrs)
            with self.api._lock:
                self.api.requests.append(Request(verb, split.path, query, content_type, body, who.user, attrs, allowed))
            if not who.admin and self.api.session_record:
                rbac.record_session(rbac.Use(who.user, attrs, allowed))
            if not allowed:
                raise attrs.forbidden(who.user)
            route = parse_route(split.path, query)
            fault = self.api.take_fault(verb, route)
            if fault is not None and fault.mode == "hang":
                self.api.stopping.wait(30)  # longer than any client timeout in the tests
                self.close_connection = True
                return
            if fault is not None and fault.mode == "error":
                reason = {409: "Conflict", 429: "TooManyRequests", 503: "ServiceUnavailable"}.get(fault.code)
                message = fault.message or f"injected fault ({fault.code})"
                error = ApiError(fault.code, reason or "InternalError", message)
                self._send(fault.code, error.status())
                return
            if verb == "watch":
                self._watch(route, fault)
                return
            code, payload, kind = self._dispatch(method, route, body, content_type)
            self._send(code, payload, kind)
        except ApiError as exc:
            self._send(exc.code, exc.status())

    def _dispatch(self, method: str, route: Route, body: Any, content_type: str) -> tuple[int, Any, str]:
        store, r, ns, name = self.api.store, route.resource, route.namespace or "", route.name
        json_type = "application/json"
        if method == "GET" and name is None:
            items, rv = store.list(
                r, route.namespace, route.query.get("labelSelector"), route.query.get("fieldSelector")
            )
            listing = {"kind": f"{r.kind}List", "apiVersion": r.api_version, "metadata": {"resourceVersion": rv}}
            return 200, {**listing, "items": items}, json_type
        if name is None and method != "POST":
            raise ApiError(405, "MethodNotAllowed", f"{method} needs an object name")
        if route.subresource == "log":
            store.get(r, ns, name or "")
            provider, provided = self.api.log_provider, None
            if provider is not None:
                provided = provider(ns, name or "", route.query.get("container"))
            text = provided if provided is not None else self.api.pod_logs.get((ns, name or ""), "")
            tail = route.query.get("tailLines")
            if tail:
                text = "\n".join(text.splitlines()[-int(tail) :]) + "\n"
            return 200, text.encode(), "text/plain"
        if route.subresource not in (None, "status") or (route.subresource == "status" and not r.status):
            raise ApiError(404, "NotFound", f"{r.plural} has no subresource {route.subresource!r}")
        if method == "GET":
            return 200, store.get(r, ns, name or ""), json_type
        if method == "POST":
            if not isinstance(body, dict):
                raise ApiError(400, "BadRequest", "the body must be a JSON object")
            return 201, store.create(r, ns, body, keep_status=not r.status or r.kind == "Node"), json_type
        if method == "PUT":
            return 200, store.replace(r, ns, name or "", body, route.subresource), json_type
        if method == "PATCH":
            return 200, store.patch(r, ns, name or "", body, content_type, route.subresource), json_type
        deleted = store.delete(r, ns, name or "")
        if r.group == "argoproj.io" or r.kind == "Pod":  # these answer with the deleted object
            return 200, deleted, json_type
        if r.kind == "Job" and route.query.get("propagationPolicy") in ("Background", "Foreground"):
            self._delete_owned_pods(deleted)
        details = {"name": name, "kind": r.plural, "uid": deleted["metadata"]["uid"]}
        status = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "details": details}
        return 200, status, json_type

    def _delete_owned_pods(self, job: Obj) -> None:
        pods = BY_PATH[("", "v1", "pods")]
        items, _ = self.api.store.list(pods, job["metadata"]["namespace"], f"job-name={job['metadata']['name']}")
        for pod in items:
            self.api.store.delete(pods, pod["metadata"]["namespace"], pod["metadata"]["name"])

    def _watch(self, route: Route, fault: Fault | None) -> None:
        """Stream watch events as chunked JSON lines until timeoutSeconds, a dropped-watch fault, or shutdown."""
        store, query = self.api.store, route.query
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.send_header("Connection", "close")  # a watch's connection is never reused
        self.end_headers()
        limit = fault.after_events if fault is not None and fault.mode == "drop" else None
        timeout = float(query.get("timeoutSeconds") or 30)
        sent = 0

        def emit(kind: str, obj: Obj) -> bool:
            nonlocal sent
            line = dumps({"type": kind, "object": obj}) + b"\n"
            self.wfile.write(f"{len(line):x}\r\n".encode() + line + b"\r\n")
            self.wfile.flush()
            sent += 1
            return limit is None or sent < limit

        def wanted(namespace: str, obj: Obj) -> bool:
            labels = obj["metadata"].get("labels") or {}
            return (
                (route.namespace is None or namespace == route.namespace)
                and matches_labels(labels, query.get("labelSelector"))
                and matches_fields(obj, query.get("fieldSelector"))
            )

        try:
            start = query.get("resourceVersion")
            if limit == 0:
                raise BrokenPipeError
            if not start or start == "0":
                items, rv = store.list(
                    route.resource, route.namespace, query.get("labelSelector"), query.get("fieldSelector")
                )
                cursor = int(rv)
                for item in items:
                    if not emit("ADDED", item):
                        raise BrokenPipeError
            else:
                cursor = int(start)
            deadline = threading.Event()
            timer = threading.Timer(timeout, deadline.set)
            timer.start()
            try:
                while not deadline.is_set() and not self.api.stopping.is_set():
                    with store.changed:
                        events = [
                            e
                            for e in store.events_after(cursor)
                            if e.resource == route.resource and wanted(e.namespace, e.object)
                        ]
                        if not events:
                            cursor = store.resource_version
                            store.changed.wait(0.2)
                            continue
                    for event in events:
                        cursor = event.rv
                        if not emit(event.type, event.object):
                            raise BrokenPipeError
            finally:
                timer.cancel()
            self.wfile.write(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            with contextlib.suppress(OSError):
                self.wfile.write(b"0\r\n\r\n")
        self.close_connection = True
