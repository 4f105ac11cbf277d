"""The promotion's verify step and the engine that serves its gates: vLLM by default; where this machine's vLLM
build cannot serve the artifact's format, transformers, and the record and report say so (never silently).
An artifact the engine refuses is rejected with the engine's reason and nothing is committed.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from pipeline import promotion, vllm
from pipeline.config import load_config
from pipeline.errors import TerminalError
from pipeline.gitops import GitOps, init_repo
from pipeline.serve import choose_engine
from pipeline.steps import verify as verify_step
from pipeline.store import store_from_settings
from pipeline.verify import verify_in_process

CONFIG = """\
version: 1
gitops: {{url: ./remote.git}}
artifacts: {{store: local, path: ./artifact-store}}
model:
  served_name: tiny-llama
  quantization:
    method: gptq
    calibration: {{samples: 16, max_seq_len: 64}}
environments:
  local:
    values_file: envs/local/values.yaml
    cache: {{root: {cache}}}
    gpu_pool: {{gpus_per_replica: 0}}
{gates}"""
GATES = (
    "    gates:\n"
    "      eval: {suite: smoke}\n"
    "      load:\n"
    "        profile: {concurrency: 2, duration_s: 6, warmup_s: 1, prompt_tokens: 16, max_tokens: 8}\n"
    "        slo: {latency_ms: {ttft_p95: 5000, e2e_p95: 20000}, max_error_rate: 0.01, min_requests: 5}\n"
)


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture
def site(tmp_path: Path, shared_cache: Path) -> Path:
    init_repo(tmp_path / "remote.git")
    (tmp_path / "promotion.yaml").write_text(CONFIG.format(cache=shared_cache, gates=""))
    return tmp_path


def commits(site: Path) -> list[str]:
    shown = subprocess.run(
        ["git", "--git-dir", str(site / "remote.git"), "log", "--format=%s", "main"],
        capture_output=True,
        text=True,
        check=True,
    )
    return [line for line in shown.stdout.splitlines() if line.startswith("promote")]


def test_the_engine_is_vllm_unless_this_machines_build_cannot_serve_the_format(
    tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MODELCTL_VLLM_URL", raising=False)
    assert choose_engine(tiny_model) == ("vllm", None), "an unquantized model: vLLM serves it everywhere"
    quantized = tmp_path / "awq"
    quantized.mkdir()
    (quantized / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": "awq"}}))
    monkeypatch.setattr(vllm, "cpu_unsupported", lambda _: "no AVX-512 here")
    engine, why = choose_engine(quantized)
    assert engine == "transformers"
    assert why is not None and "no W4A16 kernel (no AVX-512)" in why and vllm.chart_version() in why
    monkeypatch.setattr(vllm, "cpu_unsupported", lambda _: None)
    assert choose_engine(quantized) == ("vllm", None), "a host whose build has the kernel serves it with vLLM"
    monkeypatch.setenv("MODELCTL_VLLM_URL", "http://127.0.0.1:8000")
    monkeypatch.setattr(vllm, "cpu_unsupported", lambda _: "no AVX-512 here")
    assert choose_engine(quantized) == ("vllm", None), "in a Job's pod the vLLM sidecar serves"


@pytest.mark.slow
def test_the_record_names_the_engine_that_served_and_why_it_fell_back(
    tiny_model: Path, site: Path, shared_cache: Path
) -> None:
    (site / "promotion.yaml").write_text(CONFIG.format(cache=shared_cache, gates=GATES))
    cfg = load_config(site / "promotion.yaml")
    record = promotion.promote(cfg, "local", str(tiny_model), workdir=site / "work")
    assert record.decision == "promoted" and record.verify is not None and record.verify.passed
    entry = Path(cfg.environments["local"].cache.root) / ".artifacts" / record.artifact.id  # type: ignore[union-attr]
    engine, why = choose_engine(entry)
    stored = GitOps.open(str(site / "remote.git"), site / "look").record("local", record.id)
    assert stored.served_by == record.served_by and stored.serving_fallback == record.serving_fallback
    assert record.verify.engine == engine
    assert record.load_report is not None and record.load_report.served_by == record.served_by, "the load's server"
    # the gates' reports are kept by the bytes' digest, where the guard and `modelctl gitops verify` read them
    store = store_from_settings(cfg.artifacts)  # type: ignore[arg-type]
    digest = record.artifact.manifest_digest  # type: ignore[union-attr]
    assert store.get_report(digest, "eval") == json.loads(record.eval_report.model_dump_json())  # type: ignore[union-attr]
    assert (store.get_report(digest, "load") or {}).get("served_by") == record.served_by
    if engine == "transformers":  # this machine's vLLM build has no 4-bit kernel: said, never silent
        assert record.served_by is not None and record.served_by.startswith("transformers ")
        assert record.serving_fallback == why and "no AVX-512" in why  # type: ignore[operator]
        assert f"**Served by:** {record.served_by}: {why}" in record.markdown()
    else:
        assert record.served_by == f"vllm {vllm.chart_version()}" and record.serving_fallback is None
        assert f"**Served by:** vllm {vllm.chart_version()}" in record.markdown()


@pytest.mark.slow
def test_an_artifact_the_engine_refuses_is_rejected_and_nothing_is_committed(
    tiny_model: Path, site: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The fallback engine (no vLLM start) refuses the artifact with its own error: the verify step must reject it.
    import pipeline.verify

    def refuse(_: Path) -> tuple[str, int]:
        raise RuntimeError("no kernel for this weight format")

    monkeypatch.setattr(verify_step, "choose_engine", lambda _: ("transformers", "vLLM cannot serve it here"))
    monkeypatch.setattr(pipeline.verify, "_in_process_probe", refuse)
    fresh = tmp_path / "verify-cache"  # not the cache where a passing verification of these bytes may be
    monkeypatch.setattr(verify_step, "verify_in_process", lambda d, why: verify_in_process(d, why, cache_dir=fresh))
    cfg = load_config(site / "promotion.yaml")
    with pytest.raises(TerminalError) as info:
        promotion.promote(cfg, "local", str(tiny_model), workdir=site / "work")
    message = str(info.value)
    assert "was rejected for local, nothing was committed" in message
    assert "RuntimeError: no kernel for this weight format" in message, "the engine's own reason"
    assert commits(site) == []
    shutil.rmtree(fresh, ignore_errors=True)
    monkeypatch.undo()
    again = promotion.promote(cfg, "local", str(tiny_model), workdir=site / "work")  # the good case passes
    assert again.decision == "promoted" and len(commits(site)) == 1
