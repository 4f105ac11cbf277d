"""A working clone of the GitOps repo: open, commit, push with fetch/redo/retry, revert, history. Git's only door.

A promotion is one commit: the environment's values file (edited round-trip, so only the intended lines change)
plus its PromotionRecord under ``records/<env>/``, with a structured subject and trailers. ``history`` and
``current`` read the trailers with one ``git log``, never the files.
"""

from __future__ import annotations

import difflib
import functools
import logging
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Concatenate, ParamSpec, TypeVar

from git import GitCommandError, Repo
from ruamel.yaml import YAML
from ruamel.yaml.error import YAMLError

from pipeline.config import GitOpsRepo
from pipeline.errors import PipelineError, TerminalError, TransientError
from pipeline.gitops.clone import CloneLock, clone_into, default_workdir
from pipeline.gitops.commits import (
    CHART,
    LOG_FORMAT,
    RECORDS,
    CommitResult,
    HistoryEntry,
    Pending,
    Plan,
    Promotion,
    live_promotions,
    one_line,
    parse_log,
)
from pipeline.gitops.remote import auth_env, classify, secrets_of
from pipeline.gitops.values import check_values, edit_values, flatten, get_key
from pipeline.record import PromotionRecord, RolloutOutcome, new_promotion_id
from pipeline.secrets import has_credentials, redact

log = logging.getLogger(__name__)

_P = ParamSpec("_P")
_R = TypeVar("_R")


def _locked(method: Callable[Concatenate[GitOps, _P], _R]) -> Callable[Concatenate[GitOps, _P], _R]:
    """Run a method holding the clone's inter-process lock (one writer per clone)."""

    @functools.wraps(method)
    def wrapper(self: GitOps, *args: _P.args, **kwargs: _P.kwargs) -> _R:
        with self.lock.held():
            return method(self, *args, **kwargs)

    return wrapper


class GitOps:
    """A working clone of the GitOps repo, owned by the pipeline (local edits in it are discarded on sync).

    Every public method holds the clone's lock (:class:`CloneLock`), so processes sharing a clone take turns.
    """

    max_attempts = 6
    sleep: Callable[[float], None] = staticmethod(time.sleep)  # the push retry's wait; tests replace it

    def __init__(
        self, repo: Repo, url: str, branch: str, token_env: str, mode: str, lock: CloneLock | None = None
    ) -> None:
        self.repo = repo
        self.url = url
        self.branch = branch
        self.token_env = token_env
        self.mode = mode
        self.workdir = Path(repo.working_tree_dir or ".")
        self.lock = lock or CloneLock(self.workdir)

    @classmethod
    def open(
        cls,
        url: str,
        workdir: str | Path,
        *,
        branch: str = "main",
        token_env: str = "GITOPS_TOKEN",
        mode: str = "push",
        author_name: str = "modelctl",
        author_email: str = "modelctl@localhost",
    ) -> GitOps:
        """Clone ``url`` into ``workdir`` (or reuse the clone there) and bring it to the remote's tip.

        Raises:
            TerminalError: credentials in the URL, a workdir holding something else, refused credentials.
            TransientError: the remote could not be reached.
        """
        if has_credentials(url):
            raise TerminalError(
                f"GitOps URL {redact(url)} carries credentials", hint=f"remove them; put the token in ${token_env}"
            )
        workdir = Path(workdir)
        env = auth_env(url, token_env) | {
            "GIT_AUTHOR_NAME": author_name, "GIT_AUTHOR_EMAIL": author_email,
            "GIT_COMMITTER_NAME": author_name, "GIT_COMMITTER_EMAIL": author_email,
        }  # fmt: skip
        lock = CloneLock(workdir)
        with lock.held():
            repo = clone_into(url, workdir, branch, env, token_env)
            repo.git.update_environment(**env)
            gitops = cls(repo, url, branch, token_env, mode, lock)
            gitops.sync()
        return gitops

    @classmethod
    def from_settings(cls, settings: GitOpsRepo, workdir: str | Path | None = None) -> GitOps:
        """Open the repo that promotion.yaml's ``gitops`` section names, in ``workdir`` or the default clone dir."""
        return cls.open(
            settings.url,
            workdir or default_workdir(settings.url, settings.branch),
            branch=settings.branch,
            token_env=settings.token_env,
            mode=settings.mode,
            author_name=settings.author_name,
            author_email=settings.author_email,
        )

    def _scrub(self, text: str) -> str:
        """``text`` without any secret, including the token of this repo's custom token variable."""
        return redact(text, extra=secrets_of(self.token_env))

    @property
    def remote(self) -> str:
        """The remote as shown to people: never with credentials."""
        return self._scrub(self.url)

    def _git(self, *args: str, what: str = "git") -> str:
        try:
            return str(self.repo.git.execute(["git", *args]))
        except GitCommandError as exc:
            raise classify(exc, what, self.url, self.token_env) from None

    def _tip(self) -> str:
        return self._git("rev-parse", f"refs/remotes/origin/{self.branch}")

    def _reset(self, commit: str) -> None:
        self._git("checkout", "-q", "-B", self.branch, commit)
        self._git("reset", "-q", "--hard", commit)
        self._git("clean", "-qfd")

    def _fetch(self) -> str:
        refspec = f"+refs/heads/{self.branch}:refs/remotes/origin/{self.branch}"
        self._git("fetch", "-q", "origin", refspec, what=f"fetching {self.remote}")
        return self._tip()

    @_locked
    def sync(self) -> str:
        """Fetch the branch and reset the clone to it; returns the tip commit."""
        tip = self._fetch()
        self._reset(tip)
        return tip

    def _values(self, commit: str, values_file: str) -> Any:
        try:
            return YAML(typ="safe").load(self._git("show", f"{commit}:{values_file}"))
        except (PipelineError, YAMLError):
            return None

    @_locked
    def plan(self, promotion: Promotion, values_file: str) -> Plan:
        """The diff a promotion would commit (validated against the chart's schema), without writing anything.

        Raises:
            TerminalError: no such values file, or the result breaks values.schema.json.
        """
        before = self._read(values_file)
        after = edit_values(before, promotion.changes())
        check_values(after, self.workdir / CHART, values_file)
        diff = "".join(difflib.unified_diff(before.splitlines(True), after.splitlines(True), values_file, values_file))
        old, new = YAML(typ="safe").load(before) or {}, YAML(typ="safe").load(after) or {}
        changed = {
            k: (get_key(old, k), get_key(new, k)) for k in promotion.changes() if get_key(old, k) != get_key(new, k)
        }
        return Plan(promotion.env, values_file, self._scrub(promotion.subject()), self._scrub(diff), changed)

    def _read(self, values_file: str) -> str:
        path = self.workdir / values_file
        if not path.is_file():
            raise TerminalError(
                f"{values_file} does not exist in the GitOps repo {self.remote}",
                hint="check environments.<env>.values_file, or create the file from gitops/envs/",
            )
        return path.read_text(encoding="utf-8")

    @_locked
    def promote(self, promotion: Promotion, values_file: str, record: PromotionRecord | None = None) -> CommitResult:
        """Commit and push a promotion; a skip when it is already in history or already the current state.

        Raises:
            TerminalError: bad values (nothing written), a concurrent change of the same keys, refused credentials.
            TransientError: the push did not land within the bounded retries.
        """
        self.sync()
        prepared = self.prepare(promotion, values_file, record)
        return prepared if isinstance(prepared, CommitResult) else self.publish(prepared)

    @_locked
    def prepare(
        self, promotion: Promotion, values_file: str, record: PromotionRecord | None = None
    ) -> Pending | CommitResult:
        """Validate, write and commit locally (not pushed). Returns a skipped result when nothing would change."""
        done = self._find(promotion.id)
        if done is not None:
            return CommitResult(promotion.env, promotion.id, done.commit, done.subject, skipped=True)
        if record is not None and (record.id != promotion.id or record.env != promotion.env):
            raise TerminalError(f"record {record.id}/{record.env} does not match promotion {promotion.id}")
        before = self._read(values_file)
        after = edit_values(before, promotion.changes())
        check_values(after, self.workdir / CHART, values_file)
        base = self._tip()
        if after == before:
            now = self.current(promotion.env)
            commit = now.commit if now else base
            return CommitResult(promotion.env, promotion.id, commit, "already current", skipped=True)
        record = record or PromotionRecord(
            id=promotion.id,
            env=promotion.env,
            decision="promoted",
            model={"repo": promotion.model, "sha": promotion.revision},
            artifact={"id": promotion.artifact, "format": promotion.format},
            flow_run=promotion.flow_run or None,
        )
        files = {values_file: after, f"{RECORDS}/{promotion.env}/{promotion.id}.json": record.to_json()}
        subject = self._scrub(promotion.subject())
        commit = self._commit(files, subject, promotion.trailers(), base)
        return Pending(
            promotion.env, promotion.id, values_file, list(promotion.changes()), base, commit, subject,
            redo=lambda: self.prepare(promotion, values_file, record),
        )  # fmt: skip

    def _commit(self, files: dict[str, str], subject: str, trailers: dict[str, str], base: str) -> str:
        """Write files and commit them with a subject and trailers; on any failure the clone goes back to base."""
        body = "\n".join(f"{key}: {one_line(value)}" for key, value in trailers.items() if value)
        message = self.workdir / ".git" / "MODELCTL_COMMIT_MSG"
        try:
            for name, text in files.items():
                path = self.workdir / name
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(self._scrub(text) if name.startswith(RECORDS) else text, encoding="utf-8")
            self._git("add", "--", *files)
            message.write_text(self._scrub(f"{subject}\n\n{body}\n"), encoding="utf-8")
            try:
                self._git("commit", "-q", "-F", str(message), what="git commit")
            except PipelineError as exc:
                raise TerminalError(
                    f"could not commit {subject!r}: {exc.what}",
                    hint="with commit.gpgsign on, check gpg.format and user.signingkey in the clone's git config",
                ) from None
        except BaseException:
            self._reset(base)
            raise
        commit = self._git("rev-parse", "HEAD")
        log.info("committed %s: %s", commit[:12], self._scrub(subject))
        return commit

    @_locked
    def publish(self, pending: Pending) -> CommitResult:
        """Push a local commit: on a moved remote fetch, check for a same-key conflict, redo on the tip, retry."""
        if self.mode == "pull-request":
            branch = f"modelctl/{pending.env}/{pending.promotion_id}"
            self._git("push", "-q", "origin", f"{pending.commit}:refs/heads/{branch}", what=f"pushing to {self.remote}")
            seen = self._git("ls-remote", "origin", f"refs/heads/{branch}", what=f"reading {self.remote}").split()
            if not seen or seen[0] != pending.commit:
                raise TransientError(
                    f"pushed {pending.subject!r} to {branch} of {self.remote}, but the branch does not hold it",
                    hint="run the step again (it is idempotent)",
                )
            return pending.result(pushed=True, branch=branch, attempts=1)
        failure: PipelineError | None = None
        moved = False
        for attempt in range(1, self.max_attempts + 1):
            try:
                self._git(
                    "push",
                    "-q",
                    "origin",
                    f"{pending.commit}:refs/heads/{self.branch}",
                    what=f"pushing to {self.remote}",
                )
            except TransientError as exc:
                failure = exc
                log.warning(
                    "push to %s failed (attempt %d of %d): %s", self.remote, attempt, self.max_attempts, exc.what
                )
            except TerminalError:
                self._reset(self._tip())
                raise
            try:
                tip = self._fetch()
            except TransientError as exc:
                failure, tip = exc, ""
            if tip and self._contains(tip, pending.commit):  # seen on the remote: only now is it "pushed"
                self._reset(tip)
                log.info("pushed %s to %s (attempt %d)", pending.commit[:12], self.remote, attempt)
                return pending.result(pushed=True, branch=self.branch, attempts=attempt)
            if attempt == self.max_attempts:
                break
            self.sleep(random.uniform(0, 0.05 * 2**attempt))  # jittered backoff between tries, not a test timing
            if not tip or tip == pending.base:
                continue  # the remote did not move: push the same commit again
            moved = True
            self._reset(tip)
            self._conflicts(pending, tip)
            redone = pending.redo()
            if isinstance(redone, CommitResult):
                return redone
            pending = redone
        self._reset(self._tip())
        reason = failure.what if failure else "unknown"
        raise TransientError(
            f"could not push {pending.subject!r} to {self.remote} after {self.max_attempts} attempts: {reason}",
            hint=("the remote keeps moving" if moved else "the remote could not be reached or declined the push")
            + "; check it, then run the step again (it is idempotent)",
        )

    def _contains(self, tip: str, commit: str) -> bool:
        """True when ``commit`` is ``tip`` or one of its ancestors (it is on the fetched remote branch)."""
        try:
            self.repo.git.execute(["git", "merge-base", "--is-ancestor", commit, tip])
        except GitCommandError:
            return False
        return True

    def _conflicts(self, pending: Pending, tip: str) -> None:
        """Raise when the remote changed the keys this commit changes since it was based."""
        before, now = self._values(pending.base, pending.values_file), self._values(tip, pending.values_file)
        moved = [key for key in pending.keys if get_key(before, key) != get_key(now, key)]
        if moved:
            who = self._git("log", "--format=%h %an <%ae>: %s", f"{pending.base}..{tip}", "--", pending.values_file)
            raise TerminalError(
                f"{pending.values_file}: {', '.join(moved)} changed on {self.branch} while {pending.subject!r} was "
                f"being pushed, by: {'; '.join(who.splitlines()) or 'unknown'}",
                hint=f"another change to {pending.env} landed first; see `modelctl history --env {pending.env}` "
                "and promote again if this one is still wanted",
            )

    @_locked
    def revert(
        self,
        ref: str,
        reason: str = "",
        flow_run: str = "",
        *,
        env: str = "",
        values_file: str = "",
        rollout: RolloutOutcome | None = None,
    ) -> CommitResult:
        """Undo a promotion (by promotion id or commit) with a new commit carrying its own trailers.

        With ``env``, a commit the pipeline did not make (a person's: no trailers, or trailers without the record
        the pipeline writes beside them) is reverted too, by sha; the revert's subject names it and its author.
        ``rollout`` (the canary's timeline up to the failure) goes into the revert's record, so Git keeps the
        figures that decided it.

        Raises:
            TerminalError: no such promotion, or later commits changed the same lines (revert those first).
        """
        self.sync()
        prepared = self._prepare_revert(ref, reason, flow_run, new_promotion_id(), env, values_file, rollout)
        return prepared if isinstance(prepared, CommitResult) else self.publish(prepared)

    def _foreign(self, ref: str, env: str) -> HistoryEntry | None:
        """A commit the pipeline did not make, named by its full sha, as a history entry keyed by it (else None)."""
        if len(ref) != 40 or any(c not in "0123456789abcdef" for c in ref):
            return None  # never a promotion id or a short sha that happens to resolve
        try:
            full = self._git("rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}")
        except PipelineError:
            return None
        if not full:
            return None
        author, stamp, subject = self._git("log", "-n", "1", "--format=%an <%ae>%x1f%ct%x1f%s", full).split("\x1f", 2)
        return HistoryEntry(full, author, int(stamp), subject, promotion_id=full, env=env, action="promote")

    def _prepare_revert(
        self,
        ref: str,
        reason: str,
        flow_run: str,
        revert_id: str,
        env: str = "",
        values_file: str = "",
        rollout: RolloutOutcome | None = None,
    ) -> Pending | CommitResult:
        target = self._find(ref) or self._entry(ref)
        foreign = False
        if env and (
            target is None or f"{RECORDS}/{target.env}/{target.promotion_id}.json" not in self._files(target.commit)
        ):
            target, foreign = self._foreign(ref, env), True  # a person's commit (a forged trailer included)
        if target is None or target.action != "promote":
            raise TerminalError(
                f"{ref!r} is not a promotion commit or promotion id on {self.branch} of {self.remote}",
                hint="pick one from `modelctl history --env ENV`",
            )
        done = self._find_revert(target.promotion_id)
        if done is not None:
            return CommitResult(target.env, done.promotion_id, done.commit, done.subject, skipped=True)
        files = self._files(target.commit)
        if values_file not in files:
            values_file = next(f for f in files if not f.startswith(f"{RECORDS}/"))
        base = self._tip()
        merge = len(self._git("rev-list", "--parents", "-n", "1", target.commit).split()) > 2
        try:
            self._git("revert", "--no-commit", *(["-m", "1"] if merge else []), target.commit)
        except PipelineError:
            self._git("revert", "--abort")
            who = self._git("log", "--format=%h %an: %s", f"{target.commit}..{base}", "--", values_file)
            raise TerminalError(
                f"cannot revert {target.subject!r}: later commits changed the same lines: "
                + "; ".join(who.splitlines()),
                hint="revert the later commits first, or promote the wanted model instead",
            ) from None
        records = [f for f in files if f.startswith(f"{RECORDS}/")]
        if records:  # a revert keeps the records: history stays readable
            self._git("checkout", target.commit, "--", *records)
        restored = YAML(typ="safe").load(self._read(values_file)) or {}
        what = f"{target.promotion_id} {target.model}@{target.revision[:12]}"
        if foreign:
            what = f"{target.commit[:12]} by {target.author}: {target.subject}"
        subject = self._scrub(one_line(f"revert({target.env}): {what}"))
        now = {
            k: str(get_key(restored, f"model.{k.lower()}") or "") for k in ("Repo", "Revision", "Artifact", "Format")
        }
        trailers = {
            "Promotion-Id": revert_id, "Environment": target.env, "Action": "revert", "Reverts": target.promotion_id,
            "Reverted-Commit": target.commit, "Model": now["Repo"], "Revision": now["Revision"],
            "Artifact": now["Artifact"], "Format": now["Format"], "Reason": reason, "Flow-Run": flow_run,
        }  # fmt: skip
        record = PromotionRecord(
            id=revert_id, env=target.env, decision="reverted", reason=self._scrub(one_line(reason)),
            reverts=target.promotion_id, commit=target.commit, flow_run=flow_run or None, rollout=rollout,
        )  # fmt: skip
        current = self._read(values_file)
        files_out = {values_file: current, f"{RECORDS}/{target.env}/{revert_id}.json": record.to_json()}
        old, new = self._values(target.commit, values_file), self._values(f"{target.commit}^", values_file)
        keys = [k for k, v in flatten(old).items() if flatten(new).get(k) != v]
        commit = self._commit(files_out, subject, trailers, base)
        return Pending(
            target.env, revert_id, values_file, keys, base, commit, subject,
            redo=lambda: self._prepare_revert(target.commit, reason, flow_run, revert_id, env, values_file, rollout),
        )  # fmt: skip

    def _log(self, *args: str, rev: str = "") -> list[HistoryEntry]:
        return parse_log(
            self._git("log", f"--format={LOG_FORMAT}", *args, rev or f"refs/remotes/origin/{self.branch}", "--")
        )

    @_locked
    def history(self, env: str, limit: int | None = None) -> list[HistoryEntry]:
        """The environment's promotions and reverts, newest first, read from commit trailers."""
        return self._log(*(["-n", str(limit)] if limit else []), f"--grep=^Environment: {env}$")

    @_locked
    def current(self, env: str) -> HistoryEntry | None:
        """The latest promotion or revert of the environment: its trailers name what runs there now."""
        found = self.history(env, limit=1)
        return found[0] if found else None

    def _find(self, promotion_id: str) -> HistoryEntry | None:
        found = self._log("-n", "1", "--fixed-strings", f"--grep=Promotion-Id: {promotion_id}")
        return found[0] if found and found[0].promotion_id == promotion_id else None

    def _find_revert(self, promotion_id: str) -> HistoryEntry | None:
        found = self._log("-n", "1", "--fixed-strings", f"--grep=Reverts: {promotion_id}")
        return found[0] if found else None

    def _files(self, commit: str) -> list[str]:
        """The files ``commit`` changed against its first parent (every file, for a first commit)."""
        parents = self._git("rev-list", "--parents", "-n", "1", commit).split()[1:]
        if not parents:
            return self._git("show", "--name-only", "--format=", commit).splitlines()
        return self._git("diff", "--name-only", parents[0], commit).splitlines()

    def _entry(self, commit: str) -> HistoryEntry | None:
        try:
            full = self._git("rev-parse", "--verify", "--quiet", f"{commit}^{{commit}}")
        except PipelineError:
            return None
        found = self._log("-n", "1", rev=full) if full else []
        return found[0] if found else None

    @_locked
    def baseline(self, env: str) -> PromotionRecord | None:
        """The record of the promotion whose model runs in ``env`` now (reverted ones skipped): the eval baseline."""
        live = live_promotions(self.history(env))
        return self.record(env, live[0].promotion_id) if live else None

    @_locked
    def record(self, env: str, promotion_id: str) -> PromotionRecord:
        """The stored PromotionRecord of a promotion (for the next eval baseline, for reports).

        Raises:
            TerminalError: no such record.
        """
        name = f"{RECORDS}/{env}/{promotion_id}.json"
        try:
            text = self._git("show", f"refs/remotes/origin/{self.branch}:{name}")
        except PipelineError:
            raise TerminalError(f"no record {name} in {self.remote}", hint="check the promotion id") from None
        return PromotionRecord.from_json(text, where=name)
