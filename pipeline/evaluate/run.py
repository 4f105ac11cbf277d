"""Run a suite with lm-eval's Python API against local weights or an OpenAI-compatible endpoint -> EvalReport.

Local weights go through lm-eval's ``hf`` backend (``vllm`` when asked for, installed and a GPU is present). An
endpoint takes ``local-completions`` for loglikelihood tasks (the server must echo the prompt with logprobs:
checked before anything runs) and ``local-chat-completions`` for generation tasks. Tasks load through a
TaskManager that indexes only the suite's include path when every task is local (about 0.05 s instead of
about 8 s for all built-in tasks). Results are cached by (what was evaluated, suite content hash, lm-eval
version), so evaluating the same thing again returns the stored report, marked skipped, in about a second.
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import importlib
import importlib.util
import json
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any, Literal

from pipeline.config import cache_home
from pipeline.errors import TerminalError
from pipeline.evaluate.endpoint import Endpoint, leaf_tasks, run_endpoint
from pipeline.evaluate.report import EvalReport, metrics_from_results
from pipeline.evaluate.suite import Suite
from pipeline.progress import Progress
from pipeline.secrets import redact

OFFLINE_SWITCHES = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")


@dataclass(frozen=True)
class LocalWeights:
    """A model directory (a quantized artifact or any transformers-loadable model) evaluated in this process."""

    path: Path
    backend: Literal["hf", "vllm"] = "hf"
    device: str = "cpu"
    batch_size: int = 32
    chat_template: bool = False


Target = LocalWeights | Endpoint


def subject_of(target: Target) -> str:
    """What was evaluated, for the cache key and the report: the artifact id, a weights hash, or endpoint + model.

    Raises:
        TerminalError: a local path that is not a model directory.
    """
    if isinstance(target, Endpoint):
        target.check()
        return target.subject or redact(f"endpoint {target.base} model {target.model}", target.secrets())
    path = Path(target.path)
    if not (path / "config.json").is_file():
        raise TerminalError(
            f"{path} is not a model directory (no config.json)",
            hint="pass a quantized artifact's directory, a saved transformers model, or --endpoint URL --model NAME",
        )
    manifest = path / "artifact.json"
    if manifest.is_file():
        data = json.loads(manifest.read_text(encoding="utf-8"))
        if data.get("id"):  # keyed by the bytes too: a rebuild under the same id never reuses a score
            listing = sorted([f["name"], f["size"], f["sha256"]] for f in data.get("files", []))
            bytes_id = hashlib.sha256(json.dumps(listing, separators=(",", ":")).encode()).hexdigest()
            return f"artifact {data['id']} manifest sha256:{bytes_id}"
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(str(file.relative_to(path)).encode() + b"\0")
        with file.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return f"weights sha256:{digest.hexdigest()}"


def cache_key(subject: str, suite: Suite, backend: str) -> str:
    """The result cache's key: what was evaluated, how, the suite's content and the lm-eval version."""
    parts = [subject, backend, suite.sha256, version("lm_eval")]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:32]


@contextmanager
def offline_switches(offline: bool) -> Iterator[None]:
    """With ``offline``, set the Hub offline switches (environment and already-imported libraries); restore after."""
    if not offline:
        yield
        return
    saved = {name: os.environ.get(name) for name in OFFLINE_SWITCHES}
    patched: list[tuple[Any, str, Any]] = []
    os.environ.update(dict.fromkeys(OFFLINE_SWITCHES, "1"))
    for module_name, attr in (("huggingface_hub.constants", "HF_HUB_OFFLINE"), ("datasets.config", "HF_HUB_OFFLINE")):
        module = _imported(module_name)
        if module is not None and hasattr(module, attr):
            patched.append((module, attr, getattr(module, attr)))
            setattr(module, attr, True)
    try:
        yield
    finally:
        for module, attr, old in patched:
            setattr(module, attr, old)
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _imported(name: str) -> Any:
    return sys.modules.get(name) or (importlib.import_module(name) if importlib.util.find_spec(name) else None)


@functools.lru_cache(maxsize=4)
def _full_index(include: str | None) -> Any:
    """A TaskManager over every built-in task (plus ``include``): about 8 s to build, so built once per process."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include, include_defaults=True)


def task_manager(suite: Suite) -> Any:
    """A TaskManager over the suite's include path alone when that has every task, else with the built-ins too.

    Raises:
        TerminalError: a task the suite names is neither local nor built in (with the closest names).
    """
    from lm_eval.tasks import TaskManager

    include = suite.include_path
    manager = TaskManager(include_path=include, include_defaults=False) if include else None
    if manager is None or any(name not in manager.all_tasks for name in suite.tasks):
        manager = _full_index(include)
    for name in suite.tasks:
        if name not in manager.all_tasks:
            close = difflib.get_close_matches(name, manager.all_tasks, n=3)
            where = f" or in {include}" if include else ""
            raise TerminalError(
                f"{suite.path}: tasks.{name}: unknown lm-eval task {name!r} (not built in{where})",
                hint=(f"did you mean {', '.join(close)}? " if close else "")
                + "check the name with `lm_eval ls tasks`, or add a task YAML under the suite's include_path",
            )
    return manager


def _spec(manager: Any, name: str) -> str | dict[str, Any]:
    """The task spec to load: its name, or for a local YAML its config with data files made absolute."""
    from lm_eval.tasks._yaml_loader import load_yaml

    entry = manager.task_index.get(name)
    yaml_path = getattr(entry, "yaml_path", None)
    if yaml_path is None or "/lm_eval/tasks/" in str(yaml_path):
        return name
    config = load_yaml(yaml_path, resolve_func=True)
    files = (config.get("dataset_kwargs") or {}).get("data_files")
    if config.get("dataset_path") in ("json", "csv", "parquet", "text") and files:
        folder = Path(yaml_path).parent

        def absolute(value: Any) -> Any:
            if isinstance(value, str):
                return str(folder / value) if not Path(value).is_absolute() else value
            if isinstance(value, list):
                return [absolute(v) for v in value]
            if isinstance(value, dict):
                return {k: absolute(v) for k, v in value.items()}
            return value

        config["dataset_kwargs"] = {**config["dataset_kwargs"], "data_files": absolute(files)}
    return config


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return redact(text.splitlines()[0] if text else type(exc).__name__)


def load_tasks(suite: Suite, offline: bool = True) -> tuple[Any, dict[str, Any]]:
    """Load every task of the suite (datasets included), with the suite's few-shot settings applied.

    Returns the TaskManager and ``{suite task name: Task or Group}``.

    Raises:
        TerminalError: an unknown task, or a dataset that is missing (offline: not in the local cache).
    """
    manager = task_manager(suite)
    loaded: dict[str, Any] = {}
    for name, spec in suite.tasks.items():
        try:
            with offline_switches(offline):
                built = manager.load([_spec(manager, name)])
        except (ConnectionError, FileNotFoundError) as exc:
            mode = "offline (no Hub)" if offline else "online"
            raise TerminalError(
                f"{suite.path}: tasks.{name}: its dataset could not be loaded {mode}: {_first_line(exc)}",
                hint="download the dataset into the Hugging Face cache on a machine with Hub access (run the "
                "suite once with --online), or point HF_DATASETS_CACHE at a cache that has it; for a local task, "
                "check its data_files",
            ) from None
        except (ValueError, KeyError, TypeError, ImportError, OSError) as exc:
            raise TerminalError(
                f"{suite.path}: tasks.{name}: lm-eval could not build the task: {_first_line(exc)}",
                hint="check the task's YAML (`lm_eval` documents every key) or its name in the suite",
            ) from None
        for task in built["tasks"].values():
            if spec.num_fewshot is not None:
                task.set_config(key="num_fewshot", value=spec.num_fewshot)
        groups = built.get("groups", {})
        loaded[name] = groups[name] if name in groups else next(iter(built["tasks"].values()))
    return manager, loaded


def _samples(suite: Suite, loaded: dict[str, Any]) -> dict[str, list[int]] | None:
    """Per-task document indices for tasks with a ``limit`` (lm-eval's own ``limit`` is one for all tasks)."""
    chosen: dict[str, list[int]] = {}
    for name, spec in suite.tasks.items():
        if spec.limit is None:
            continue
        for task in leaf_tasks(loaded[name]):
            chosen[task.task_name] = list(range(min(spec.limit, len(task.eval_docs))))
    return chosen or None


def _run_local(target: LocalWeights, manager: Any, items: list[Any], samples: dict[str, list[int]] | None) -> Any:
    import lm_eval

    if target.backend == "vllm":
        if importlib.util.find_spec("vllm") is None or not target.device.startswith("cuda"):
            raise TerminalError(
                "the vllm backend needs vllm installed and a GPU device",
                hint="use the hf backend on this machine, or run on the GPU pool with --device cuda",
            )
        args: dict[str, Any] = {"pretrained": str(target.path), "dtype": "auto"}
    else:
        args = {"pretrained": str(target.path), "dtype": "float32" if target.device == "cpu" else "auto"}
    return lm_eval.simple_evaluate(
        model=target.backend,
        model_args=args,
        tasks=items,
        task_manager=manager,
        device=target.device,
        batch_size=target.batch_size,
        samples=samples,
        apply_chat_template=target.chat_template,
        bootstrap_iters=1000,
        log_samples=False,
    )


def evaluate(
    target: Target,
    suite: Suite,
    *,
    cache_dir: Path | None = None,
    use_cache: bool = True,
    store: bool = True,
    offline: bool = True,
    progress: Progress | None = None,
) -> EvalReport:
    """Evaluate ``target`` on ``suite``, or return the cached report (marked skipped) when it exists.

    ``use_cache=False`` measures again; ``store=False`` keeps the result out of the cache (a re-measurement of
    what is live must not replace the result the artifact was promoted with).

    Raises:
        TerminalError: a bad model directory, an unknown task, a missing dataset, an endpoint without logprobs.
        TransientError: the endpoint cannot be reached.
    """
    started = time.perf_counter()
    subject = subject_of(target)
    backend = target.backend if isinstance(target, LocalWeights) else "local-completions+local-chat-completions"
    key = cache_key(subject, suite, backend)
    cached_file = (cache_dir or cache_home()) / "evaluations" / f"{key}.json"
    if use_cache and cached_file.is_file():
        try:
            report = EvalReport.model_validate_json(cached_file.read_text(encoding="utf-8"))
            return report.model_copy(update={"skipped": True})
        except ValueError:
            pass  # a damaged cache entry is re-evaluated and overwritten
    if progress:
        progress(f"loading the {suite.name} suite's tasks", 0.05)
    manager, loaded = load_tasks(suite, offline)
    samples = _samples(suite, loaded)
    if progress:
        progress(f"evaluating {len(loaded)} tasks with lm-eval", 0.15)
    with offline_switches(offline):
        if isinstance(target, LocalWeights):
            raw = _run_local(target, manager, list(loaded.values()), samples)
        else:
            raw = run_endpoint(target, manager, list(loaded.values()), samples)
    report = EvalReport(
        suite=suite.name,
        suite_sha256=suite.sha256,
        subject=subject,
        backend=backend,
        lm_eval_version=version("lm_eval"),
        tasks=metrics_from_results(raw or {}, list(suite.tasks)),
        seconds=round(time.perf_counter() - started, 2),
    )
    if store:
        cached_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached_file.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(report.model_dump_json(indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, cached_file)
    if progress:
        progress("done", 1.0)
    return report
