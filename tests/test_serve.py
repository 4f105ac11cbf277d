"""The fallback serving engine (`transformers serve`) on the small model: start, load-test, always stop."""

from __future__ import annotations

import os
import shutil
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from pipeline.config import LoadProfile, Slo
from pipeline.errors import TerminalError
from pipeline.loadtest import Target, gate, run_load, synthetic_prompts
from pipeline.serve import local_server


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture(scope="module")
def quantized_model(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The small model as a 4-bit artifact: llmcompressor W4A16, group 128, compressed-tensors (pack-quantized),
    the format the pipeline's llmcompressor backend writes (round-to-nearest here: calibration is not the point)."""
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path_factory.mktemp("w4a16")
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype="auto")
    oneshot(model=model, recipe=QuantizationModifier(targets="Linear", scheme="W4A16", ignore=["lm_head"]))
    model.save_pretrained(out, save_compressed=True)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(out)
    assert "quantization_config" in (out / "config.json").read_text()
    return out


@pytest.mark.slow
def test_a_short_load_test_completes_against_the_local_server(quantized_model: Path, tmp_path: Path) -> None:
    # bounded by the request count, not the clock: a busy machine makes it slower, never different
    profile = LoadProfile(concurrency=2, duration_s=120, warmup_s=0, max_requests=10, prompt_tokens=16, max_tokens=8)
    with local_server(quantized_model, engine="transformers", log_dir=tmp_path) as server:
        assert server.url.startswith("http://127.0.0.1:")
        for api in ("chat", "completions"):
            report = run_load(
                Target(server.url, server.model), profile.model_copy(update={"api": api}),
                synthetic_prompts(16, quantized_model), timeout_s=60,
            )  # fmt: skip
            assert report.errors == {} and report.successes == 10, report.errors
            assert report.output_tokens.mean and report.output_tokens.mean >= 1
            result = gate(report, Slo(latency_ms={"e2e_p50": 30_000}, min_requests=10))
            assert result.passed, result.summary()
    assert not _alive(server.pid)  # always stopped afterwards
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"{server.url}/health", timeout=2)


def test_a_directory_without_a_model_is_refused_before_starting(tmp_path: Path) -> None:
    with (
        pytest.raises(TerminalError, match="not a model directory"),
        local_server(tmp_path, engine="transformers", log_dir=tmp_path / "l"),
    ):
        pass
    assert not (tmp_path / "l").exists()  # nothing was started, not even a log


@pytest.mark.slow
def test_a_server_that_fails_to_start_reports_its_log_tail(tiny_model: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model, broken)
    (broken / "model.safetensors").write_bytes(b"not safetensors at all")
    with (
        pytest.raises(TerminalError) as caught,
        local_server(broken, engine="transformers", log_dir=tmp_path / "logs", startup_timeout_s=120),
    ):
        pass
    message = str(caught.value)
    assert "exited with code" in message and "its log ends with:" in message
    assert "safetensors" in message.lower() or "header" in message.lower()  # the cause, from the server's own log
