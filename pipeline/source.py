"""A model reference (a Hub repo id with an optional revision, or a local directory) -> a pinned ModelSource.

Nothing is built from a branch name: a Hub revision is pinned to its 40-hex commit sha first, and a local
directory gets a 40-hex content digest, so the same bytes always have the same identity. Everything that would
make a promotion unsafe is refused here, before any weight is downloaded: a malformed id, a missing repo or
revision, a gated repo without a token, pickle-only weights, a model that needs ``trust_remote_code``.

Example:
    >>> source = resolve("demo-output/tiny")  # doctest: +SKIP
    >>> source.kind, len(source.sha)  # doctest: +SKIP
    ('local', 40)
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from pipeline.errors import TerminalError, TransientError
from pipeline.secrets import redact

REPO_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95})(?:@(?P<rev>[\w./-]{1,255}))?$")
SHA40 = re.compile(r"^[0-9a-f]{40}$")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
WEIGHT_SUFFIXES = (".safetensors", *PICKLE_SUFFIXES)
# Only these files are needed to quantize and serve; anything else in a repo (images, ONNX, GGUF) is skipped.
MODEL_FILE_PATTERNS = [
    "*.json",
    "*.safetensors",
    "*.jinja",
    "*.model",
    "*.txt",
    "*.py",
    *(f"*{s}" for s in PICKLE_SUFFIXES),
]


class SourceFile(BaseModel):
    """One file of the source: its size and, where known, its sha256 (the Hub only gives it for LFS files)."""

    model_config = ConfigDict(frozen=True)

    name: str
    size: int | None = None
    sha256: str | None = None
    git_sha1: str | None = Field(None, description="the git blob id (the Hub's check for files not in LFS)")


class ModelSource(BaseModel):
    """A model pinned to an immutable revision."""

    model_config = ConfigDict(frozen=True)

    kind: Literal["hub", "local"]
    repo: str
    sha: str
    revision: str | None = None
    path: str | None = None
    files: list[SourceFile]
    license: str | None = None

    @property
    def ref(self) -> str:
        """`repo@sha12`, as shown to people and written into commit subjects."""
        return f"{self.repo}@{self.sha[:12]}"


class SourcePolicy(BaseModel):
    """What a source may be. Defaults are the safe ones."""

    model_config = ConfigDict(frozen=True)

    allow_pickle: bool = False
    trust_remote_code: bool = False
    token_env: str = "HF_TOKEN"


def _token(policy: SourcePolicy) -> str | None:
    return os.environ.get(policy.token_env) or None


def looks_local(ref: str) -> bool:
    """A reference is a local directory when it exists or is written as a path."""
    return ref.startswith(("./", "../", "/", "~")) or Path(ref).expanduser().is_dir()


def resolve(ref: str, policy: SourcePolicy | None = None) -> ModelSource:
    """Pin a model reference and check it is safe to build from.

    Raises:
        TerminalError: malformed reference, missing repo/revision/directory, gated without a token,
            pickle-only weights, or remote code that is not allowed.
        TransientError: the Hub could not be reached or answered 5xx.
    """
    policy = policy or SourcePolicy()
    if looks_local(ref):
        return _resolve_local(Path(ref).expanduser(), policy)
    match = REPO_ID.match(ref)
    if not match or ".." in ref or "--" in match.group("repo"):
        raise TerminalError(
            f"{ref!r} is not a model reference",
            hint="use a Hub repo id like 'org/name' or 'org/name@revision', or the path of a local directory",
        )
    return _resolve_hub(match.group("repo"), match.group("rev"), policy)


def file_sha256(path: Path) -> str:
    """The sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _check_safety(name: str, files: list[SourceFile], config: dict[str, Any] | None, policy: SourcePolicy) -> None:
    weights = [f.name for f in files if f.name.endswith(WEIGHT_SUFFIXES)]
    if not weights:
        raise TerminalError(f"{name} has no weight files", hint="point at a model repo or directory with weights")
    if not any(w.endswith(".safetensors") for w in weights) and not policy.allow_pickle:
        raise TerminalError(
            f"{name} only has pickle weights ({', '.join(sorted(weights)[:3])}), which can run code when loaded",
            hint="use a revision with .safetensors weights, or set model.allow_pickle: true if you trust it",
        )
    if config is None:
        raise TerminalError(f"{name} has no config.json", hint="point at a transformers model")
    if config.get("auto_map") and not policy.trust_remote_code:
        raise TerminalError(
            f"{name} needs trust_remote_code (its config.json has auto_map: {sorted(config['auto_map'])})",
            hint="review its code, then set model.trust_remote_code: true, or pick a model without remote code",
        )


def check_safetensors(path: Path) -> None:
    """Refuse an empty or truncated ``.safetensors`` file by name, before any library reads it.

    The format is an 8-byte little-endian header length, a JSON header naming each tensor's byte range, then
    the data: the file must hold the whole header and every range.

    Raises:
        TerminalError: the file is empty, cut short, or its header is not readable.
    """
    size = path.stat().st_size
    hint = "the file was cut short (a full disk, an interrupted copy?): rebuild the model or download it again"
    with open(path, "rb") as handle:
        head = handle.read(8)
        length = int.from_bytes(head, "little") if len(head) == 8 else -1
        if size == 0 or length < 0:
            raise TerminalError(f"{path} is empty or truncated ({size} bytes): no safetensors header", hint=hint)
        if 8 + length > size:
            raise TerminalError(
                f"{path} is truncated: its header needs {8 + length} bytes, the file has {size}", hint=hint
            )
        try:
            header = json.loads(handle.read(length))
            end = max((int(t["data_offsets"][1]) for k, t in header.items() if k != "__metadata__"), default=0)
        except (ValueError, KeyError, TypeError, IndexError, AttributeError):
            raise TerminalError(f"{path} is damaged: its safetensors header is not readable", hint=hint) from None
    if 8 + length + end > size:
        raise TerminalError(
            f"{path} is truncated: its tensors need {8 + length + end} bytes, the file has {size}", hint=hint
        )


def _resolve_local(path: Path, policy: SourcePolicy) -> ModelSource:
    if not path.is_dir():
        raise TerminalError(f"model directory {path} does not exist", hint="check the path")
    for weights in sorted(path.rglob("*.safetensors")):
        check_safetensors(weights)
    files = [
        SourceFile(name=str(p.relative_to(path)), size=p.stat().st_size, sha256=file_sha256(p))
        for p in sorted(path.rglob("*"))
        if p.is_file() and not p.name.startswith(".")
    ]
    config_file = path / "config.json"
    try:
        config = json.loads(config_file.read_text()) if config_file.is_file() else None
    except ValueError as exc:
        raise TerminalError(f"{config_file} is not valid JSON: {exc}") from None
    _check_safety(str(path), files, config, policy)
    # A content digest stands in for a commit: same bytes, same identity, wherever the directory is.
    listing = "\n".join(f"{f.name}\t{f.sha256}" for f in files)
    sha = hashlib.sha1(listing.encode(), usedforsecurity=False).hexdigest()
    return ModelSource(
        kind="local", repo=f"local/{path.resolve().name}", sha=sha, path=str(path.resolve()), files=files
    )


def _hub_error(exc: Exception, repo: str, revision: str | None) -> Exception:
    """Map huggingface_hub and network errors to ours, with messages free of tokens."""
    from huggingface_hub import errors

    where = f"{repo}@{revision}" if revision else repo
    if isinstance(exc, errors.GatedRepoError):
        return TerminalError(f"{where} is gated and the token was refused or missing", hint="set HF_TOKEN")
    if isinstance(exc, errors.RevisionNotFoundError):
        return TerminalError(f"revision {revision!r} does not exist in {repo}", hint="check the branch, tag or sha")
    if isinstance(exc, errors.RepositoryNotFoundError):
        return TerminalError(
            f"model repo {repo} does not exist (or is private and no token was given)",
            hint="check the repo id; for a private repo set HF_TOKEN",
        )
    status = getattr(getattr(exc, "response", None), "status_code", None)
    if isinstance(exc, errors.HfHubHTTPError) and status is not None and status < 500 and status != 429:
        return TerminalError(f"the Hub refused {where}: HTTP {status}: {redact(str(exc))[:300]}")
    return TransientError(f"could not reach the Hub for {where}: {redact(str(exc))[:300]}", hint="retry later")


def _resolve_hub(repo: str, revision: str | None, policy: SourcePolicy) -> ModelSource:
    import httpx
    from huggingface_hub import HfApi, constants, errors, hf_hub_download

    if constants.is_offline_mode():
        raise TerminalError(
            f"cannot pin {repo}: the Hub is switched off here (HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE is set)",
            hint="unset the offline switch, or pass a local model directory",
        )
    token = _token(policy)
    endpoint = os.environ.get("HF_ENDPOINT") or None
    api = HfApi(endpoint=endpoint, token=token or False)
    try:
        info = api.model_info(repo, revision=revision, files_metadata=True)
    except (errors.HfHubHTTPError, httpx.HTTPError, OSError) as exc:
        raise _hub_error(exc, repo, revision) from None
    if info.gated and not token:
        raise TerminalError(
            f"{repo} is gated ({info.gated} approval): downloading it needs a token",
            hint=f"accept the model's terms on the Hub, then set {policy.token_env}",
        )
    sha = info.sha or ""
    if not SHA40.match(sha):
        raise TransientError(f"the Hub gave no commit sha for {repo}@{revision or 'main'}", hint="retry later")
    files = [
        SourceFile(
            name=s.rfilename,
            size=s.lfs.size if s.lfs else s.size,
            sha256=s.lfs.sha256 if s.lfs else None,
            git_sha1=None if s.lfs else s.blob_id,
        )
        for s in info.siblings or []
    ]
    config = None
    if any(f.name == "config.json" for f in files):
        try:
            config_path = hf_hub_download(repo, "config.json", revision=sha, token=token or False, endpoint=endpoint)
            config = json.loads(Path(config_path).read_text())
        except (errors.HfHubHTTPError, httpx.HTTPError, OSError) as exc:
            raise _hub_error(exc, repo, sha) from None
    _check_safety(f"{repo}@{sha[:12]}", files, config, policy)
    card = info.card_data
    license_ = getattr(card, "license", None) if card is not None else None
    return ModelSource(kind="hub", repo=repo, sha=sha, revision=revision, files=files, license=license_)


def fetch(source: ModelSource, policy: SourcePolicy | None = None) -> Path:
    """A local directory holding the source's model files (downloaded at the pinned sha for Hub sources).

    Raises:
        TransientError: the download failed for a reason that may pass.
        TerminalError: the Hub refused the download.
    """
    if source.kind == "local":
        assert source.path is not None
        return Path(source.path)
    import httpx
    from huggingface_hub import errors, snapshot_download

    policy = policy or SourcePolicy()
    try:
        path = snapshot_download(
            source.repo,
            revision=source.sha,
            allow_patterns=MODEL_FILE_PATTERNS,
            token=_token(policy) or False,
            endpoint=os.environ.get("HF_ENDPOINT") or None,
        )
    except (errors.HfHubHTTPError, httpx.HTTPError, OSError) as exc:
        raise _hub_error(exc, source.repo, source.sha) from None
    return Path(path)
