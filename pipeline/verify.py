"""Verify: prove an artifact loads in vLLM (the engine and release production runs) before it can be promoted.

The artifact is served with the args the chart gives the vLLM container, then asked for a completion and for
prompt logprobs (what the eval gate's multiple-choice tasks need). If vLLM cannot load it, the artifact is
refused with vLLM's own error line. The result is cached by the artifact's manifest digest together with the
vLLM release and the chart's rendered args, so verifying the same bytes again is a file read.

Example:
    >>> verify_artifact(Path("/models/tiny-awq")).passed  # doctest: +SKIP
    True
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import time
from collections.abc import Callable
from contextlib import ExitStack
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
from pydantic import BaseModel, Field

from pipeline import vllm
from pipeline.errors import TerminalError
from pipeline.evaluate.report import EvalReport
from pipeline.serve import LocalServer, local_server
from pipeline.tinymodel import default_cache_dir

PROMPT = "The color of"
_WRAPPERS = ("See root cause above", "Engine core initialization failed", "Worker failed with error")
_ERROR_LINE = re.compile(r"\b([A-Z]\w*(?:Error|Exception)): (.+)")


class VerifyResult(BaseModel):
    """What verifying an artifact found: which bytes, which engine, and vLLM's answers (or its refusal)."""

    digest: str
    passed: bool
    served_by: str
    args_sha256: str
    completion: str | None = None
    prompt_logprobs: int = 0  # how many prompt tokens came back with a logprob
    reason: str | None = None
    startup_s: float | None = None
    verified_at: str
    engine: str = "vllm"
    fallback: str | None = Field(None, description="why the artifact was not loaded in vLLM here, when it was not")
    skipped: bool = False  # true when this call found the result in the cache
    eval_report: EvalReport | None = Field(
        None, description="the eval suite run against the same vLLM while it served (one server start), if asked"
    )


def manifest_digest(artifact_dir: Path) -> str:
    """The digest of an artifact's bytes (``sha256:<hex>``), as pipeline/store.py defines it.

    The file list comes from ``artifact.json`` when there is one, else every file is hashed (a plain model
    directory). Until pipeline/store.py is importable, the same formula is computed here.
    """
    manifest = artifact_dir / "artifact.json"
    if manifest.is_file():
        files = [(f["name"], f["size"], f["sha256"]) for f in json.loads(manifest.read_text(encoding="utf-8"))["files"]]
    else:
        files = []
        for path in sorted(p for p in artifact_dir.rglob("*") if p.is_file()):
            data = path.read_bytes()
            files.append((path.relative_to(artifact_dir).as_posix(), len(data), hashlib.sha256(data).hexdigest()))
    try:
        from pipeline.quantize.recipe import ArtifactFile
        from pipeline.store import manifest_digest as store_digest

        return store_digest(ArtifactFile(name=n, size=s, sha256=h) for n, s, h in files)
    except ImportError:  # the same formula: sha256 over sorted [name, size, sha256], compact JSON
        listing = sorted([n, s, h] for n, s, h in files)
        return "sha256:" + hashlib.sha256(json.dumps(listing, separators=(",", ":")).encode()).hexdigest()


def error_line(log: str) -> str:
    """vLLM's own reason from its log: the last ``SomethingError: message`` line (else the last line)."""
    lines = [line.strip() for line in log.splitlines() if line.strip()]
    wrapper: str | None = None
    for i in range(len(lines) - 1, -1, -1):
        match = _ERROR_LINE.search(lines[i])
        if match:
            found = f"{match.group(1)}: {match.group(2)}"
            if match.group(1) == "ValidationError" and i + 1 < len(lines):  # pydantic: the reason is the next line
                found += f": {lines[i + 1]}"
            if any(generic in found for generic in _WRAPPERS):  # the engine's "see above": look further up
                wrapper = wrapper or found
                continue
            return found[:500]
    if wrapper:
        return wrapper[:500]
    return lines[-1][:500] if lines else "(no log)"


def probe(server: LocalServer, timeout_s: float = 120.0) -> tuple[str, int]:
    """Ask a running server for a completion and for prompt logprobs: ``(completion text, logprob count)``.

    Raises:
        TerminalError: the server answers with an error, an empty completion, or no finite prompt logprobs.
    """
    url = f"{server.url}/v1/completions"
    base = {"model": server.model, "prompt": PROMPT, "temperature": 0}
    answers = []
    for extra in ({"max_tokens": 4}, {"max_tokens": 1, "echo": True, "logprobs": 1}):
        response = httpx.post(url, json=base | extra, timeout=timeout_s)
        if response.status_code != 200:
            raise TerminalError(
                f"{server.served_by} refused a request on the artifact ({response.status_code}): "
                f"{error_line(response.text)}",
                hint="the artifact loads but cannot answer; read the server log at " + str(server.log_path),
            )
        answers.append(response.json()["choices"][0])
    text = str(answers[0].get("text") or "")
    values = (answers[1].get("logprobs") or {}).get("token_logprobs") or []
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if not text.strip() or not finite:
        raise TerminalError(
            f"{server.served_by} answered without {'a completion' if not text.strip() else 'prompt logprobs'}",
            hint="the evaluation needs both; check the artifact's tokenizer and config",
        )
    return text, len(finite)


def _cache_file(cache_dir: Path, digest: str, version: str, args_sha: str) -> Path:
    name = f"{digest.removeprefix('sha256:')[:32]}-vllm{version}-{args_sha[:12]}.json"
    return cache_dir / "verify" / name


def verify_artifact(
    artifact_dir: Path,
    *,
    values: dict[str, Any] | None = None,
    cache_dir: Path | None = None,
    log_dir: Path | None = None,
    startup_timeout_s: float = 600.0,
    server: LocalServer | None = None,
    refusal_raises: bool = True,
    while_serving: Callable[[LocalServer], None] | None = None,
) -> VerifyResult:
    """Load ``artifact_dir`` in vLLM with the chart's args for ``values`` and ask it a completion and logprobs.

    Returns the cached result (``skipped=True``) for the same bytes, vLLM release and args. A running vLLM
    ``server`` already serving ``artifact_dir`` with those args may be passed to reuse it. With
    ``refusal_raises=False`` a refusal comes back as a result with ``passed=False`` and vLLM's reason.
    ``while_serving`` is called with the server once it passed (not on a cache hit): more work on the same start.

    Raises:
        TerminalError: vLLM cannot load the artifact (its own error line in the message), or cannot answer.
        TransientError: vLLM did not come up in time (not cached: it may pass on retry).
    """
    artifact_dir = Path(artifact_dir).resolve()
    if not (artifact_dir / "config.json").is_file():
        raise TerminalError(f"{artifact_dir} is not a model directory (no config.json)", hint="pass an artifact")
    version = vllm.check_runtime()
    values = vllm.load_values() if values is None else values
    args_sha = hashlib.sha256(json.dumps(vllm.container_args(values)[1:]).encode()).hexdigest()
    digest = manifest_digest(artifact_dir)
    cached = _cache_file(cache_dir or default_cache_dir(), digest, version, args_sha)
    if cached.is_file():
        result = VerifyResult.model_validate_json(cached.read_text(encoding="utf-8"))
        if not result.passed and refusal_raises:
            raise TerminalError(
                f"vLLM {version} cannot load {artifact_dir.name} (refused before, {digest[:19]}): {result.reason}",
                hint="rebuild the artifact (or change the chart's vLLM args); these bytes were refused",
            )
        return result.model_copy(update={"skipped": True})
    started = time.perf_counter()
    now = datetime.now(UTC).isoformat(timespec="seconds")
    with ExitStack() as stack:
        try:
            if server is None:
                started_server = local_server(
                    artifact_dir, engine="vllm", values=values, log_dir=log_dir, startup_timeout_s=startup_timeout_s
                )
                server = stack.enter_context(started_server)
            text, count = probe(server)
            result = VerifyResult(
                digest=digest, passed=True, served_by=server.served_by, args_sha256=args_sha, completion=text,
                prompt_logprobs=count, startup_s=server.startup_s, verified_at=now,
            )  # fmt: skip
        except TerminalError as exc:
            log = getattr(exc, "log_path", None)  # the whole log: the root cause is often far above its tail
            reason = error_line(log.read_text(encoding="utf-8", errors="replace") if log else exc.what)
            refused = VerifyResult(
                digest=digest, passed=False, served_by=f"vllm {version}", args_sha256=args_sha, reason=reason,
                startup_s=round(time.perf_counter() - started, 2), verified_at=now,
            )  # fmt: skip
            _write(cached, refused)
            if not refusal_raises:
                return refused
            tail = exc.what.split("its log ends with:", 1)[-1].strip()[-3000:]
            raise TerminalError(
                f"vLLM {version} cannot load {artifact_dir.name}: {reason}\nvLLM's log ends with:\n{tail}",
                hint="the artifact is refused and nothing is promoted: rebuild it, or fix the chart's vLLM args",
            ) from None
        _write(cached, result)
        if while_serving is not None:
            while_serving(server)  # its errors are its own: the artifact did load and answer
    return result


def _write(path: Path, result: VerifyResult) -> None:
    """Write a result atomically (a crash never leaves half a cache entry)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(result.model_dump_json(indent=2, exclude={"skipped"}) + "\n", encoding="utf-8")
    tmp.replace(path)


def verify_in_process(artifact_dir: Path, fallback: str, *, cache_dir: Path | None = None) -> VerifyResult:
    """Where vLLM cannot serve the artifact here (``fallback`` says why): load it with transformers in this process
    and check it answers a completion and gives finite prompt logprobs. Labelled as such; a pass is cached by digest.

    Raises:
        TerminalError: not a model directory (a load failure comes back as ``passed=False`` with its reason).
    """
    artifact_dir = Path(artifact_dir).resolve()
    if not (artifact_dir / "config.json").is_file():
        raise TerminalError(f"{artifact_dir} is not a model directory (no config.json)", hint="pass an artifact")
    from importlib.metadata import version as dist_version

    served_by = f"transformers {dist_version('transformers')} (in-process)"
    digest = manifest_digest(artifact_dir)
    name = f"{digest.removeprefix('sha256:')[:32]}-{served_by.split()[1]}-in-process.json"
    cached = (cache_dir or default_cache_dir()) / "verify" / name
    if cached.is_file():
        return VerifyResult.model_validate_json(cached.read_text(encoding="utf-8")).model_copy(update={"skipped": True})
    now = datetime.now(UTC).isoformat(timespec="seconds")
    base: dict[str, Any] = {"digest": digest, "served_by": served_by, "args_sha256": "", "verified_at": now}
    base |= {"engine": "transformers", "fallback": fallback}
    started = time.perf_counter()
    try:
        text, count = _in_process_probe(artifact_dir)
        result = VerifyResult(passed=True, completion=text, prompt_logprobs=count, **base)
    except Exception as exc:  # any load or forward failure is the artifact's refusal
        result = VerifyResult(passed=False, reason=f"{type(exc).__name__}: {exc}"[:500], **base)
    result = result.model_copy(update={"startup_s": round(time.perf_counter() - started, 2)})
    if result.passed:  # a refusal here may be this process's (a missing package): tried again next time
        _write(cached, result)
    return result


def _in_process_probe(artifact_dir: Path) -> tuple[str, int]:
    """A greedy completion and the prompt's logprobs from the artifact loaded with transformers."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(artifact_dir)
    model: Any = AutoModelForCausalLM.from_pretrained(artifact_dir, dtype="auto")
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=4, do_sample=False)
        logits = model(ids).logits.float()
    text = str(tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True))
    logprobs = torch.log_softmax(logits[0, :-1], dim=-1).gather(1, ids[0, 1:, None]).squeeze(1)
    finite = int(torch.isfinite(logprobs).sum())
    if not text.strip() or finite == 0:
        raise ValueError(f"the model answered without {'a completion' if not text.strip() else 'prompt logprobs'}")
    return text, finite
