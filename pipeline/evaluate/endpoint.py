"""Evaluate through an OpenAI-compatible endpoint: loglikelihood tasks via ``local-completions``, generation via
``local-chat-completions``, both with ``num_concurrent`` parallel requests.

Loglikelihood (multiple-choice) tasks need the server to echo the prompt with logprobs on ``/v1/completions``;
many servers (``transformers serve`` among them) do not, so that is probed before anything runs. Tokens for
the endpoint come from an environment variable and are redacted from every message.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx

from pipeline.errors import TerminalError, TransientError
from pipeline.secrets import has_credentials, redact
from pipeline.serve import LocalServer, local_server

if TYPE_CHECKING:
    from pipeline.evaluate.report import EvalReport
    from pipeline.evaluate.suite import Suite

SERVED_BACKEND = "local-completions+local-chat-completions"


@dataclass(frozen=True)
class Endpoint:
    """An OpenAI-compatible server. ``url`` is its base (``http://host:port`` or ``.../v1``)."""

    url: str
    model: str
    num_concurrent: int = 4
    tokenizer: str | None = None
    api_key_env: str | None = None
    tokenized_requests: bool = False  # send token ids (vLLM takes them: context lengths then match exactly)
    subject: str | None = None  # what is evaluated, when known (the served artifact): keys the result cache
    chat: bool = True  # generation through chat completions (the chat template); False: plain completions

    @property
    def base(self) -> str:
        """The server's root URL, without a trailing ``/v1``."""
        return self.url.rstrip("/").removesuffix("/v1")

    def check(self) -> None:
        """Validate before anything runs.

        Raises:
            TerminalError: credentials in the URL (they would reach logs), or not an http(s) URL.
        """
        if has_credentials(self.url):
            raise TerminalError(
                f"the endpoint URL {redact(self.url)} carries credentials; they would end up in logs and reports",
                hint="put the token in an environment variable and name it with --api-key-env",
            )
        if not self.url.startswith(("http://", "https://")):
            raise TerminalError(
                f"the endpoint URL {redact(self.url)} is not http(s)", hint="e.g. http://127.0.0.1:8000"
            )

    def secrets(self) -> tuple[str, ...]:
        token = os.environ.get(self.api_key_env, "") if self.api_key_env else ""
        return (token,) if token else ()


@contextmanager
def bearer_token(token: str | None) -> Iterator[None]:
    """Hand the token to lm-eval's API models the one way that is never logged: ``OPENAI_API_KEY``, for the call.

    (``model_args`` are logged by lm-eval, so the token never goes there.)
    """
    if token is None:
        yield
        return
    saved = os.environ.get("OPENAI_API_KEY")
    os.environ["OPENAI_API_KEY"] = token
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("OPENAI_API_KEY", None)
        else:
            os.environ["OPENAI_API_KEY"] = saved


def leaf_tasks(item: Any) -> list[Any]:
    """The leaf tasks of a loaded task or group."""
    return list(item.get_all_tasks()) if hasattr(item, "get_all_tasks") else [item]


def probe_logprobs(endpoint: Endpoint, timeout_s: float = 30.0) -> None:
    """Check that the endpoint's /v1/completions echoes the prompt with logprobs (loglikelihood tasks need it).

    Raises:
        TransientError: the endpoint cannot be reached or answers 5xx.
        TerminalError: it answers, but without echo + logprobs (or refuses the request).
    """
    body = {"model": endpoint.model, "prompt": "Q: ping\nA:", "max_tokens": 1, "temperature": 0, "echo": True}
    body["logprobs"] = 1
    headers = {"Authorization": f"Bearer {endpoint.secrets()[0]}"} if endpoint.secrets() else {}
    shown = redact(endpoint.base, endpoint.secrets())
    try:
        response = httpx.post(f"{endpoint.base}/v1/completions", json=body, headers=headers, timeout=timeout_s)
    except httpx.HTTPError as exc:
        raise TransientError(
            f"endpoint {shown} cannot be reached: {redact(str(exc), endpoint.secrets())}",
            hint="check the URL and that the server is up; this is retried",
        ) from None
    if response.status_code >= 500:
        raise TransientError(f"endpoint {shown} answered {response.status_code} to a probe", hint="retry later")
    choice: dict[str, Any] = {}
    if response.status_code == 200:
        try:
            data = response.json()
        except ValueError:
            data = None
        choices = data.get("choices") if isinstance(data, dict) else None
        choice = choices[0] if choices else {}
    logprobs = (choice.get("logprobs") or {}).get("token_logprobs") if isinstance(choice, dict) else None
    if not logprobs:
        raise TerminalError(
            f"endpoint {shown} does not return prompt logprobs (echo + logprobs on /v1/completions answered "
            f"{response.status_code} without them), which loglikelihood (multiple-choice) tasks need",
            hint="serve the model with a server that supports them (vLLM does), evaluate the weights in-process "
            "instead of via --endpoint, or use a suite with generation tasks only",
        )


def run_endpoint(target: Endpoint, manager: Any, items: list[Any], samples: dict[str, list[int]] | None) -> Any:
    """Loglikelihood tasks through local-completions, generation through local-chat-completions."""
    import lm_eval

    generate = [i for i in items if all(t.OUTPUT_TYPE == "generate_until" for t in leaf_tasks(i))]
    likelihood = [i for i in items if i not in generate]
    results: dict[str, Any] = {"results": {}, "groups": {}, "n-samples": {}}
    runs = []
    if likelihood:
        probe_logprobs(target)
        args: dict[str, Any] = {"base_url": f"{target.base}/v1/completions", "model": target.model}
        args["tokenized_requests"] = target.tokenized_requests
        args |= {"num_concurrent": target.num_concurrent, "tokenizer": target.tokenizer or target.model}
        runs.append(("local-completions", args, likelihood, False))
    if generate and not target.chat:  # the same prompts as lm-eval's in-process run (no chat template)
        args = {"base_url": f"{target.base}/v1/completions", "model": target.model}
        args |= {"num_concurrent": target.num_concurrent, "tokenizer": target.tokenizer or target.model}
        args["tokenized_requests"] = target.tokenized_requests
        runs.append(("local-completions", args, generate, False))
    elif generate:
        args = {"base_url": f"{target.base}/v1/chat/completions", "model": target.model}
        args |= {"num_concurrent": target.num_concurrent}
        runs.append(("local-chat-completions", args, generate, True))
    for model, model_args, chosen, chat in runs:
        try:
            with bearer_token(target.secrets()[0] if target.secrets() else None):
                out = lm_eval.simple_evaluate(
                    model=model,
                    model_args=model_args,
                    tasks=chosen,
                    task_manager=manager,
                    samples=samples,
                    apply_chat_template=chat,
                    bootstrap_iters=1000,
                    log_samples=False,
                )
        except (ConnectionError, OSError) as exc:
            raise TransientError(
                f"evaluating through {redact(target.base, target.secrets())} failed: "
                f"{redact(str(exc), target.secrets())}",
                hint="check that the server is up and serves the model; this is retried",
            ) from None
        for key in results:
            results[key].update(out.get(key, {}) if out else {})
    return results


def evaluate_served(
    model_dir: Path,
    suite: Suite,
    *,
    values: dict[str, Any] | None = None,
    server: LocalServer | None = None,
    cache_dir: Path | None = None,
    log_dir: Path | None = None,
    num_concurrent: int = 4,
    use_cache: bool = True,
) -> EvalReport:
    """Evaluate ``model_dir`` as vLLM serves it (the chart's args for ``values``): the score of the bytes and
    kernels production runs. Multiple-choice tasks go through prompt logprobs (echo + logprobs).

    The result is cached by the weights (artifact id or hash), the vLLM release and the chart's args, so a repeat
    starts no server. Pass a running ``server`` (serving ``model_dir``) to reuse it.

    Raises:
        TerminalError: vLLM cannot serve the artifact (its reason), or the suite is invalid.
        TransientError: the server did not come up, or failed mid-evaluation.
    """
    from pipeline import vllm
    from pipeline.evaluate.run import LocalWeights, cache_key, evaluate, subject_of
    from pipeline.tinymodel import default_cache_dir

    model_dir = Path(model_dir).resolve()
    values = vllm.load_values() if values is None else values
    version = vllm.check_runtime()
    args = hashlib.sha256(json.dumps(vllm.container_args(values)[1:]).encode()).hexdigest()[:12]
    subject = f"{subject_of(LocalWeights(model_dir))} served by vllm {version} args {args}"

    def endpoint(url: str, model: str) -> Endpoint:
        return Endpoint(
            url, model, num_concurrent, str(model_dir), tokenized_requests=True, subject=subject, chat=False
        )

    key = cache_key(subject, suite, SERVED_BACKEND)
    if use_cache and ((cache_dir or default_cache_dir()) / "evaluations" / f"{key}.json").is_file():
        return evaluate(endpoint("http://127.0.0.1:1", "cached"), suite, cache_dir=cache_dir)
    if server is not None:
        return evaluate(endpoint(server.url, server.model), suite, cache_dir=cache_dir, use_cache=use_cache)
    with local_server(model_dir, engine="vllm", values=values, log_dir=log_dir) as started:
        report = evaluate(endpoint(started.url, started.model), suite, cache_dir=cache_dir, use_cache=use_cache)
        started.check_alive()
        return report
