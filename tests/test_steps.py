"""Step requests and results: validated on both sides, and the Job's real entrypoint builds what is configured.

The slow test builds a Kubernetes Job for the quantize step from a promotion.yaml whose recipe and source policy
differ from every default, then runs that Job's container command as a process here (the same entrypoint the
pod runs) and reads the artifact.json it wrote: a field dropped anywhere on the way shows up as a default.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.config import Calibration, ModelSettings, Quantization, load_config
from pipeline.errors import TerminalError
from pipeline.jobs import job_manifest
from pipeline.quantize import Recipe
from pipeline.quantize.recipe import MANIFEST
from pipeline.source import SourcePolicy, resolve
from pipeline.steps import QuantizeRequest, parse_request, parse_result, source_policy

ROOT = Path(__file__).resolve().parent.parent
STAGING = load_config(ROOT / "examples" / "cluster" / "promotion.yaml").environment("staging")


def test_a_request_with_a_misspelt_or_unknown_field_is_refused() -> None:
    with pytest.raises(TerminalError, match="not a valid step request"):
        parse_request('{"step": "resolve", "ref": "org/m", "polcy": {}}')
    with pytest.raises(TerminalError, match="not a valid step request"):
        parse_request('{"step": "sharpen", "ref": "org/m"}')
    assert parse_request('{"step": "resolve", "ref": "org/m"}').step == "resolve"


def test_a_result_of_the_wrong_shape_is_refused() -> None:
    line = (
        '{"step": "publish", "status": "succeeded", "started_at": "2026-01-01T00:00:00Z", "seconds": 1, "output": {}}'
    )
    with pytest.raises(TerminalError, match="not a valid publish result"):
        parse_result("publish", line)


def test_the_source_policy_comes_from_the_configuration() -> None:
    settings = ModelSettings(allow_pickle=True, trust_remote_code=True, hub_token_env="ORG_TOKEN")
    assert source_policy(settings) == SourcePolicy(allow_pickle=True, trust_remote_code=True, token_env="ORG_TOKEN")
    assert source_policy(ModelSettings()) == SourcePolicy()


def test_the_entrypoint_refuses_a_bad_request_with_exit_code_2() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "pipeline", "step", "run", "--request", '{"step": "quantize"}'],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert done.returncode == 2 and "not a valid step request" in done.stdout


@pytest.mark.slow
def test_the_quantize_job_builds_every_configured_field(tiny_model: Path, tmp_path: Path) -> None:
    calibration = tmp_path / "calibration.jsonl"
    calibration.write_text("".join(json.dumps({"text": f"fact number {i} is short."}) + "\n" for i in range(40)))
    settings = ModelSettings(
        allow_pickle=True,
        trust_remote_code=True,
        hub_token_env="ORG_HF_TOKEN",
        quantization=Quantization(
            method="gptq",
            group_size=64,
            symmetric=False,
            ignore=["lm_head", "model.layers.1.mlp.down_proj"],
            calibration=Calibration(dataset=str(calibration), samples=16, max_seq_len=48),
        ),
    )
    policy = source_policy(settings)
    recipe = Recipe.from_config(settings.quantization)
    request = QuantizeRequest(
        source=resolve(str(tiny_model), policy),
        recipe=recipe,
        backend=settings.quantization.backend,
        out_root=str(tmp_path / "artifacts"),
        policy=policy,
    )
    [container] = job_manifest(request, "staging", STAGING)["spec"]["template"]["spec"]["containers"]
    assert container["command"][:3] == ["python", "-m", "pipeline"]
    env = {**os.environ, **{e["name"]: e["value"] for e in container["env"] if "value" in e}}
    env["MODELCTL_CACHE"] = str(tmp_path / "modelctl-cache")
    env.pop("HF_HOME", None)
    done = subprocess.run(
        [sys.executable, *container["command"][1:]], capture_output=True, text=True, cwd=ROOT, env=env, timeout=900
    )
    assert done.returncode == 0, done.stderr[-2000:]
    result = parse_result("quantize", done.stdout.strip().splitlines()[-1])
    assert result.status == "succeeded"
    built = json.loads((Path(result.value().path) / MANIFEST).read_text())
    assert built["recipe"] == {
        "method": "gptq",
        "bits": 4,
        "group_size": 64,
        "symmetric": False,
        "ignore": ["lm_head", "model.layers.1.mlp.down_proj"],
        "calibration": {"dataset": str(calibration), "samples": 16, "max_seq_len": 48},
        "dtype": None,  # a cast applies to unquantized (method none) artifacts only
    }
    assert built["policy"] == {"allow_pickle": True, "trust_remote_code": True, "token_env": "ORG_HF_TOKEN"}
    defaults = Recipe(method="awq").model_dump(mode="json")
    away = [k for k in defaults if k not in ("bits", "dtype")]  # bits: 4 only; dtype: method none only
    assert all(built["recipe"][k] != defaults[k] for k in away), "every field away from default"
    assert all(built["policy"][k] != v for k, v in SourcePolicy().model_dump().items())
