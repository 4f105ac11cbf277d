"""Authentication and Kubernetes RBAC for the fake API server, evaluated as the real authorizer does.

Tokens map to identities (a ServiceAccount's ``system:serviceaccount:<ns>:<name>`` with its groups, or the admin
in ``system:masters``). Every request's attributes (verb, API group, resource, subresource, namespace, name) are
checked against the Roles, ClusterRoles, RoleBindings and ClusterRoleBindings in the store, with the rules of
kubernetes/pkg/apis/rbac/v1/evaluation_helpers.go and plugin/pkg/auth/authorizer/rbac/rbac.go:
- a rule matches when its verbs, apiGroups and resources each contain the request's (or ``*``); a subresource is
  requested as ``resource/subresource`` and matched only by that, ``*/subresource`` or ``*``; ``resourceNames``
  (when set) must contain the request's name (so never match create, or list/watch without a name);
- a ClusterRoleBinding grants everywhere (cluster scope and every namespace); a RoleBinding grants only in its own
  namespace, whether it refers to a Role (of that namespace) or a ClusterRole.
A denial answers 403 with the real server's Status message (responsewriters.forbiddenMessage).
"""

from __future__ import annotations

import secrets
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import yaml

from pipeline.resources import resource_dir

from .store import BY_KIND, ApiError, Obj, Store

ADMIN_USER = "kubernetes-admin"
MASTERS = "system:masters"  # the admin group: authorized for everything, as the real server's privileged group
RBAC_DIR = resource_dir("gitops") / "rbac"


@dataclass(frozen=True)
class Identity:
    user: str
    groups: tuple[str, ...]

    @property
    def admin(self) -> bool:
        return MASTERS in self.groups


def service_account(namespace: str, name: str) -> Identity:
    """A ServiceAccount's user name and groups, as the token authenticator gives them."""
    return Identity(
        f"system:serviceaccount:{namespace}:{name}",
        ("system:serviceaccounts", f"system:serviceaccounts:{namespace}", "system:authenticated"),
    )


ADMIN = Identity(ADMIN_USER, (MASTERS, "system:authenticated"))


@dataclass(frozen=True)
class Attributes:
    """What the authorizer decides on (authorizer.Attributes of a resource request)."""

    verb: str  # get list watch create update patch delete deletecollection
    group: str
    resource: str
    subresource: str = ""
    namespace: str = ""  # "" for cluster-scoped objects and all-namespace lists
    name: str = ""

    @property
    def combined(self) -> str:
        return f"{self.resource}/{self.subresource}" if self.subresource else self.resource

    def forbidden(self, user: str) -> ApiError:
        """The real server's 403: ``<res> "<name>" is forbidden: User "<u>" cannot <verb> resource ...``."""
        what = f'User "{user}" cannot {self.verb} resource "{self.combined}" in API group "{self.group}"'
        where = f' in the namespace "{self.namespace}"' if self.namespace else " at the cluster scope"
        qualified = f"{self.resource}.{self.group}" if self.group else self.resource
        subject = f'{qualified} "{self.name}"' if self.name else qualified
        error = ApiError(403, "Forbidden", f"{subject} is forbidden: {what}{where}")
        error.details = {"name": self.name, "group": self.group, "kind": self.resource}
        return error


@dataclass(frozen=True)
class Grant:
    """One atomic permission: one verb on one (group, resource) where a binding applies ("*": everywhere)."""

    scope: str  # a namespace, or "*" for a ClusterRoleBinding
    group: str
    resource: str
    verb: str
    names: tuple[str, ...]
    source: str  # the binding and role it comes from

    def allows(self, attrs: Attributes) -> bool:
        return (
            (self.scope == "*" or self.scope == attrs.namespace)
            and self.verb in ("*", attrs.verb)
            and self.group in ("*", attrs.group)
            and _resource_matches(self.resource, attrs)
            and (not self.names or attrs.name in self.names)
        )

    def __str__(self) -> str:
        where = "cluster-wide" if self.scope == "*" else f"in {self.scope}"
        names = f" names={list(self.names)}" if self.names else ""
        return f"{self.verb} {self.resource} ({self.group or 'core'}) {where}{names} [{self.source}]"


def _resource_matches(rule: str, attrs: Attributes) -> bool:
    if rule in ("*", attrs.combined):
        return True
    return bool(attrs.subresource) and rule == f"*/{attrs.subresource}"


def _subject_matches(subject: Obj, binding_ns: str, who: Identity) -> bool:
    kind, name = subject.get("kind"), subject.get("name")
    if kind == "User":
        return bool(name == who.user)
    if kind == "Group":
        return name in who.groups
    if kind == "ServiceAccount":
        namespace = subject.get("namespace") or binding_ns
        return bool(namespace) and who.user == f"system:serviceaccount:{namespace}:{name}"
    return False


def grants(store: Store, who: Identity) -> Iterator[Grant]:
    """Every atomic grant the bindings in ``store`` give ``who``."""
    rb, crb = BY_KIND["RoleBinding"], BY_KIND["ClusterRoleBinding"]
    bindings = store.list(crb, None)[0] + store.list(rb, None)[0]
    for binding in bindings:
        namespace = binding["metadata"].get("namespace", "")
        if not any(_subject_matches(s, namespace, who) for s in binding.get("subjects") or []):
            continue
        ref = binding.get("roleRef") or {}
        role_kind, role_name = ref.get("kind"), ref.get("name", "")
        try:
            if role_kind == "ClusterRole":
                role = store.get(BY_KIND["ClusterRole"], "", role_name)
            elif role_kind == "Role" and namespace:
                role = store.get(BY_KIND["Role"], namespace, role_name)
            else:
                continue
        except ApiError:  # a binding to a missing role grants nothing (as the real authorizer)
            continue
        scope = namespace or "*"
        kind = "RoleBinding" if namespace else "ClusterRoleBinding"
        where = f"{namespace}/" if namespace else ""
        source = f"{kind} {where}{binding['metadata']['name']} -> {role_kind} {role_name}"
        for rule in role.get("rules") or []:
            if rule.get("nonResourceURLs"):
                continue
            names = tuple(rule.get("resourceNames") or ())
            for group in rule.get("apiGroups") or []:
                for resource in rule.get("resources") or []:
                    for verb in rule.get("verbs") or []:
                        yield Grant(scope, group, resource, verb, names, source)


def authorize(store: Store, who: Identity, attrs: Attributes, without: Grant | None = None) -> bool:
    """The RBAC decision (``without``: as if that one grant were not there)."""
    if who.admin:
        return True
    return any(g.allows(attrs) for g in grants(store, who) if g != without)


class Tokens:
    """Bearer tokens the server accepts, like ServiceAccount tokens from a TokenRequest."""

    def __init__(self) -> None:
        self._by_token: dict[str, Identity] = {}
        self._lock = threading.Lock()

    def issue(self, who: Identity) -> str:
        token = secrets.token_urlsafe(24)
        with self._lock:
            self._by_token[token] = who
        return token

    def identify(self, header: str | None, store: Store) -> Identity:
        """The identity of an ``Authorization: Bearer`` header; 401 for none, an unknown token or a deleted SA."""
        scheme, _, token = (header or "").partition(" ")
        with self._lock:
            who = self._by_token.get(token.strip()) if scheme.lower() == "bearer" else None
        if who is None:
            raise ApiError(401, "Unauthorized", "Unauthorized")
        if who.user.startswith("system:serviceaccount:"):
            _, _, namespace, name = who.user.split(":", 3)
            try:
                store.get(BY_KIND["ServiceAccount"], namespace, name)
            except ApiError:
                raise ApiError(401, "Unauthorized", "Unauthorized") from None
        return who


@dataclass(frozen=True)
class Use:
    """A request as the authorizer saw it, by whom, and whether it was allowed."""

    user: str
    attrs: Attributes
    allowed: bool


# Every request by a non-admin identity, in every fake server of this test session (test_rbac compares them with
# the grants). Servers whose RBAC a test changed on purpose stop adding to it.
SESSION_USES: list[Use] = []
_SESSION_LOCK = threading.Lock()


def record_session(use: Use) -> None:
    with _SESSION_LOCK:
        SESSION_USES.append(use)


def session_uses() -> list[Use]:
    with _SESSION_LOCK:
        return list(SESSION_USES)


def manifests(folder: Path = RBAC_DIR) -> list[Obj]:
    """The objects of every YAML file in ``folder`` (gitops/rbac by default)."""
    docs: list[Obj] = []
    for path in sorted(folder.glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if isinstance(d, dict)]
    return docs


def load(store: Store, docs: Iterable[Obj]) -> None:
    """Create ServiceAccounts, Roles, ClusterRoles and their bindings in the store (other kinds are refused)."""
    for doc in docs:
        resource = BY_KIND.get(str(doc.get("kind")))
        if resource is None:
            raise ValueError(f"the fake API server does not serve {doc.get('kind')!r} (from gitops/rbac)")
        store.create(resource, (doc.get("metadata") or {}).get("namespace", ""), doc)


def request_attributes(verb: str, group: str, resource: str, sub: str | None, ns: str | None, name: str | None,
                       query: dict[str, str]) -> Attributes:  # fmt: skip
    """RequestInfo: a list or watch with ``fieldSelector=metadata.name=X`` is authorized with name X."""
    if not name and verb in ("list", "watch"):
        for part in (query.get("fieldSelector") or "").split(","):
            key, _, value = part.partition("=")
            if key.strip() == "metadata.name" and value and not value.startswith("="):
                name = value.strip()
    return Attributes(verb, group, resource, sub or "", ns or "", name or "")


def path_attributes(path: str, method: str, query: dict[str, str]) -> tuple[Attributes, bool] | None:
    """The attributes of a resource request from its path alone (the real server authorizes before it routes, so
    a kind this fake does not serve is refused, and recorded, like any other); and whether the path names an
    object. None for a path that is no resource request."""
    parts = [p for p in path.split("/") if p]
    if parts[:2] == ["api", "v1"]:
        group, rest = "", parts[2:]
    elif len(parts) >= 3 and parts[0] == "apis":
        group, rest = parts[1], parts[3:]
    else:
        return None
    namespace = ""
    if len(rest) >= 3 and rest[0] == "namespaces":
        namespace, rest = rest[1], rest[2:]
    if not rest:
        return None
    name, sub = (rest[1] if len(rest) > 1 else ""), (rest[2] if len(rest) > 2 else "")
    watching = query.get("watch") in ("true", "1")
    if method == "GET":
        verb = "watch" if watching else ("get" if name else "list")
    elif method == "DELETE":
        verb = "delete" if name else "deletecollection"
    else:
        verb = {"POST": "create", "PUT": "update", "PATCH": "patch"}.get(method, method.lower())
    return request_attributes(verb, group, rest[0], sub, namespace, name, query), bool(name)


def describe(uses: Iterable[Attributes]) -> list[str]:
    """Readable, sorted, de-duplicated ``verb resource (group) in ns`` lines."""
    return sorted(
        {f"{a.verb} {a.combined} ({a.group or 'core'}) {'in ' + a.namespace if a.namespace else 'cluster-wide'}"
         for a in uses}
    )  # fmt: skip


def unused(all_grants: Iterable[Grant], uses: Iterable[Attributes]) -> list[Grant]:
    seen = list(uses)
    return [g for g in all_grants if not any(g.allows(a) for a in seen)]
