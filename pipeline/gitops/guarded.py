"""What the guard reads and writes in the GitOps repo: commits to an environment's values the pipeline did not make.

"Made by the pipeline" means the commit's Promotion-Id trailer names a PromotionRecord that the same commit wrote
under ``records/<env>/`` (a trailer alone can be typed by anyone); the merge of a pipeline pull request counts as
the pipeline's when it brings in exactly the values of the pipeline commit it merges. The guard's own outcome is a
commit of its record alone (``Action: guarded`` or ``unvetted``), so the last guarded commit is read back from Git.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from git import GitCommandError
from ruamel.yaml import YAML
from ruamel.yaml.error import YAMLError

from pipeline.errors import TerminalError
from pipeline.gitops.commits import LOG_FORMAT, RECORDS, CommitResult, Pending, one_line, parse_log
from pipeline.gitops.repo import GitOps
from pipeline.record import PromotionRecord

GUARD_ACTIONS = ("guarded", "unvetted")


@dataclass(frozen=True)
class ValuesCommit:
    """One commit on the branch that changed an environment's values file."""

    commit: str
    author: str
    subject: str


def _git(gitops: GitOps, *args: str) -> str:
    try:
        return str(gitops.repo.git.execute(["git", *args]))
    except GitCommandError as exc:
        raise TerminalError(f"git {args[0]} failed in the GitOps clone: {one_line(str(exc.stderr))[:300]}") from None


def values_commits(gitops: GitOps, values_file: str, since: str | None) -> list[ValuesCommit]:
    """Commits on the branch (first parents: a merge counts as one change) that changed ``values_file``, newest
    first: those after ``since``, or the newest few when ``since`` is None or no longer on the branch."""
    tip = f"refs/remotes/origin/{gitops.branch}"
    span = ["-n", "20", tip]
    if since:
        try:
            gitops.repo.git.execute(["git", "merge-base", "--is-ancestor", since, tip])
            span = [f"{since}..{tip}"]
        except GitCommandError:
            pass  # history was rewritten under the mark: look at the newest change only
    text = _git(gitops, "log", "--first-parent", "--format=%H%x1f%an <%ae>%x1f%s", *span, "--", values_file)
    found = []
    for line in text.splitlines():
        commit, author, subject = [*line.split("\x1f"), "", ""][:3]
        found.append(ValuesCommit(commit, author, subject))
    return found


def changes_model(gitops: GitOps, commit: str, values_file: str) -> bool:
    """True when ``commit`` changed the ``model`` values against its first parent (a repository's first commit,
    which creates the file, changes nothing that ran before)."""
    parents = _git(gitops, "rev-list", "--parents", "-n", "1", commit).split()[1:]
    if not parents:
        return False
    before, after = values_at(gitops, parents[0], values_file), values_at(gitops, commit, values_file)
    return bool(before.get("model") != after.get("model"))


def values_at(gitops: GitOps, commit: str, values_file: str) -> dict[str, Any]:
    """The values file as of ``commit`` (empty when missing or not YAML)."""
    try:
        loaded = YAML(typ="safe").load(_git(gitops, "show", f"{commit}:{values_file}"))
    except (TerminalError, YAMLError):
        return {}
    return loaded if isinstance(loaded, dict) else {}


def record_at(gitops: GitOps, commit: str, env: str, promotion_id: str) -> PromotionRecord | None:
    """The record ``records/<env>/<id>.json`` as the commit that wrote it holds it, or None."""
    try:
        return PromotionRecord.from_json(_git(gitops, "show", f"{commit}:{RECORDS}/{env}/{promotion_id}.json"))
    except TerminalError:
        return None


def made_by_pipeline(gitops: GitOps, env: str, commit: str) -> bool:
    """True when the pipeline made ``commit``: its Promotion-Id trailer names a record the commit itself wrote, or
    it merges a pipeline commit and brings in exactly its values (a pipeline pull request's merge)."""
    parents = _git(gitops, "rev-list", "--parents", "-n", "1", commit).split()[1:]
    entries = parse_log(_git(gitops, "log", "-n", "1", f"--format={LOG_FORMAT}", commit, "--"))
    entry = entries[0] if entries else None
    if entry is not None and entry.env == env:
        name = f"{RECORDS}/{env}/{entry.promotion_id}.json"
        base = parents[0] if parents else None
        touched = (
            _git(gitops, "diff", "--name-only", base, commit)
            if base
            else _git(gitops, "show", "--name-only", "--format=", commit)
        )
        record = record_at(gitops, commit, env, entry.promotion_id) if name in touched.splitlines() else None
        if record is not None and record.id == entry.promotion_id and record.env == env:
            return True
    if len(parents) == 2:
        _, merged = parents
        values_file = _values_file(gitops, env, merged)
        if values_file and made_by_pipeline(gitops, env, merged):
            return values_at(gitops, commit, values_file) == values_at(gitops, merged, values_file)
    return False


def _values_file(gitops: GitOps, env: str, commit: str) -> str | None:
    files = _git(gitops, "show", "--name-only", "--format=", commit).splitlines()
    return next((f for f in files if f and not f.startswith(f"{RECORDS}/")), None)


def last_guarded(gitops: GitOps, env: str) -> str | None:
    """The commit the guard last picked up in ``env`` (from its newest record), or None."""
    for entry in gitops.history(env):
        if entry.action in GUARD_ACTIONS:
            record = record_at(gitops, entry.commit, env, entry.promotion_id)
            return record.commit if record is not None else None
    return None


def write_guard_record(gitops: GitOps, record: PromotionRecord, trailers: dict[str, str]) -> CommitResult:
    """Commit and push the guard's record alone (no values change), with trailers that history reads.

    Raises:
        TerminalError: the record is not a guard's; TransientError: the push did not land.
    """
    if record.guarded is None:
        raise TerminalError(f"record {record.id} is not a guard's record")
    # The record goes straight to the branch, also in pull-request mode: it changes nothing Argo CD renders, and
    # the guard reads its last guarded commit back from it.
    action = "guarded" if record.guarded.vetted else "unvetted"
    subject = one_line(f"{action}({record.env}): {record.guarded.commit[:12]} by {record.guarded.author}")
    full = {"Promotion-Id": record.id, "Environment": record.env, "Action": action, **trailers}
    name = f"{RECORDS}/{record.env}/{record.id}.json"
    with gitops.lock.held():
        gitops.sync()
        pending = _prepare(gitops, record.env, record.id, {name: record.to_json()}, subject, full)
        mode, gitops.mode = gitops.mode, "push"
        try:
            return gitops.publish(pending)
        finally:
            gitops.mode = mode


def _prepare(
    gitops: GitOps, env: str, record_id: str, files: dict[str, str], subject: str, trailers: dict[str, str]
) -> Pending:
    """The record-only commit on the fetched tip; redone on a newer tip when the remote moved (it never conflicts)."""
    base = _git(gitops, "rev-parse", f"refs/remotes/origin/{gitops.branch}")
    commit = gitops._commit(files, subject, trailers, base)
    return Pending(
        env, record_id, next(iter(files)), [], base, commit, subject,
        redo=lambda: _prepare(gitops, env, record_id, files, subject, trailers),
    )  # fmt: skip
