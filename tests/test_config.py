"""promotion.yaml: the examples validate, and every kind of bad input gets a precise error."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pipeline.config import load_config, parse_config
from pipeline.errors import ConfigError, TerminalError

ROOT = Path(__file__).resolve().parent.parent
LOCAL = ROOT / "examples" / "local" / "promotion.yaml"
CLUSTER = ROOT / "examples" / "cluster" / "promotion.yaml"

MINIMAL = """\
version: 1
gitops:
  url: ./gitops.git
environments:
  staging:
    values_file: envs/staging/values.yaml
    cache:
      root: ./cache
  prod:
    values_file: envs/prod/values.yaml
    requires: staging
    cache:
      root: ./cache
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "promotion.yaml"
    path.write_text(text)
    return path


def problems_of(path: Path) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(path)
    return info.value.problems


def test_local_example_validates_with_paths_resolved() -> None:
    cfg = load_config(LOCAL)
    env = cfg.environment("local")
    assert env.executor == "local"
    assert env.cache.root == str((ROOT / "demo-output" / "cache").resolve())
    assert cfg.gitops.url == str((ROOT / "demo-output" / "gitops-remote.git").resolve())
    assert cfg.model.source == str((ROOT / "demo-output" / "tiny").resolve())
    assert env.gates.eval is not None and env.gates.eval.suite == "smoke"
    assert env.gates.load is not None and env.gates.load.profile.concurrency == 2


def test_cluster_example_validates_staging_before_prod() -> None:
    cfg = load_config(CLUSTER)
    assert cfg.promotion_order() == ["staging", "prod"]
    prod = cfg.environment("prod")
    assert prod.executor == "kubernetes"
    assert prod.requires == ["staging"]
    assert prod.approval.required is True
    assert prod.cache.pvc == "model-cache"
    assert prod.gpu_pool.tolerations[0].key == "nvidia.com/gpu"
    assert prod.gates.load is not None and prod.gates.load.slo.latency_ms["ttft_p95"] == 300
    assert cfg.gitops.url.startswith("https://")  # a URL is kept as given, not made a path


def test_minimal_config_gets_defaults_and_single_requires_becomes_list(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, MINIMAL))
    prod = cfg.environment("prod")
    assert prod.requires == ["staging"]
    assert cfg.model.quantization.method == "awq"
    assert cfg.model.quantization.backend == "llmcompressor"
    assert prod.cache.root == str(tmp_path / "cache")
    assert cfg.gitops.url == str(tmp_path / "gitops.git")


def test_missing_key_names_file_line_and_key(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL.replace("    values_file: envs/prod/values.yaml\n", ""))
    [problem] = problems_of(path)
    assert problem == f"{path}:9: environments.prod.values_file: is required but missing"


def test_wrong_type_says_what_was_given(tmp_path: Path) -> None:
    text = MINIMAL.replace("  prod:\n", "  prod:\n    approval:\n      required: sometimes\n")
    [problem] = problems_of(write(tmp_path, text))
    assert ":11: environments.prod.approval.required:" in problem
    assert "valid boolean" in problem and "'sometimes'" in problem


def test_unknown_environment_in_requires(tmp_path: Path) -> None:
    [problem] = problems_of(write(tmp_path, MINIMAL.replace("requires: staging", "requires: [stagin]")))
    assert ":11: environments.prod.requires.0:" in problem
    assert "unknown environment 'stagin'" in problem and "prod, staging" in problem


def test_requires_cycle_is_refused(tmp_path: Path) -> None:
    text = MINIMAL.replace("  staging:\n", "  staging:\n    requires: prod\n")
    [problem] = problems_of(write(tmp_path, text))
    assert "requires cycle" in problem


def test_negative_threshold(tmp_path: Path) -> None:
    gates = (
        "    gates:\n      load:\n        profile: {concurrency: 2}\n"
        "        slo:\n          latency_ms: {ttft_p95: -300}\n          max_error_rate: 1.5\n"
    )
    [first, second] = problems_of(write(tmp_path, MINIMAL.replace("  prod:\n", "  prod:\n" + gates)))
    assert "environments.prod.gates.load.slo.latency_ms.ttft_p95: Input should be greater than 0 (got -300)" in first
    assert "environments.prod.gates.load.slo.max_error_rate" in second and "less than or equal to 1" in second


def test_unknown_quantization_method(tmp_path: Path) -> None:
    text = MINIMAL.replace("environments:", "model:\n  quantization:\n    method: awk\nenvironments:")
    [problem] = problems_of(write(tmp_path, text))
    assert ":6: model.quantization.method: Input should be 'awq', 'gptq' or 'none' (got 'awk')" in problem


def test_backend_that_cannot_do_the_method(tmp_path: Path) -> None:
    text = MINIMAL.replace(
        "environments:", "model:\n  quantization:\n    method: gptq\n    backend: autoawq\nenvironments:"
    )
    [problem] = problems_of(write(tmp_path, text))
    assert "model.quantization" in problem and "only does method 'awq'" in problem


def test_unreadable_files(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    [problem] = problems_of(missing)
    assert problem == f"{missing}: cannot read the file: No such file or directory"
    [problem] = problems_of(tmp_path)  # a directory
    assert "cannot read the file: Is a directory" in problem
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    [problem] = problems_of(binary)
    assert "cannot read the file" in problem


def test_invalid_yaml_and_empty_file(tmp_path: Path) -> None:
    [problem] = problems_of(write(tmp_path, "gitops: [url\nenvironments: {}\n"))
    assert "not valid YAML" in problem
    [problem] = problems_of(write(tmp_path, ""))
    assert "the file is empty" in problem
    [problem] = problems_of(write(tmp_path, "- a list\n"))
    assert "expected a mapping at the top level" in problem


def test_misspelled_key_is_not_ignored(tmp_path: Path) -> None:
    [problem] = problems_of(write(tmp_path, MINIMAL.replace("    requires: staging", "    require: staging")))
    assert "environments.prod.require: is not a known key" in problem


def test_kubernetes_executor_needs_cluster_settings(tmp_path: Path) -> None:
    text = MINIMAL.replace("    requires: staging\n", "    requires: staging\n    executor: kubernetes\n")
    [problem] = problems_of(write(tmp_path, text))
    assert "executor 'kubernetes' needs argocd, rollout, endpoint, image, cache.pvc" in problem


def test_load_profile_needs_exactly_one_mode(tmp_path: Path) -> None:
    gates = "    gates:\n      load:\n        profile: {concurrency: 2, rate: 5}\n        slo: {}\n"
    [problem] = problems_of(write(tmp_path, MINIMAL.replace("  prod:\n", "  prod:\n" + gates)))
    assert "set exactly one of 'rate'" in problem


def test_values_file_must_stay_inside_the_repo(tmp_path: Path) -> None:
    text = MINIMAL.replace("envs/prod/values.yaml", "../../etc/values.yaml")
    [problem] = problems_of(write(tmp_path, text))
    assert "environments.prod.values_file: must be a relative path inside the GitOps repo" in problem


def test_all_problems_are_reported_at_once(tmp_path: Path) -> None:
    text = MINIMAL.replace("url: ./gitops.git", "url: 42\n  branchh: main").replace("root: ./cache", "root: 7")
    problems = problems_of(write(tmp_path, text))
    assert len(problems) >= 2
    assert any("gitops.branchh" in p for p in problems)


def test_credentials_in_url_are_refused_without_echoing_them(tmp_path: Path) -> None:
    token = "ghp_" + "S3cr3tT0k3nValue1234"
    text = MINIMAL.replace("url: ./gitops.git", f"url: https://bot:{token}@git.example.com/gitops.git")
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text))
    assert "must not contain credentials" in str(info.value)
    assert token not in str(info.value) and token not in repr(info.value.problems)


def test_config_error_is_terminal() -> None:
    with pytest.raises(TerminalError):
        parse_config("version: 2\n")


def test_unknown_environment_lookup() -> None:
    cfg = load_config(LOCAL)
    with pytest.raises(ConfigError, match="no such environment"):
        cfg.environment("prod")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_permission_denied(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL)
    path.chmod(0)
    [problem] = problems_of(path)
    assert "Permission denied" in problem


def test_a_bare_model_source_is_never_silently_taken_for_the_hub(tmp_path: Path) -> None:
    text = MINIMAL + "model:\n  source: tiny\n"
    (problem,) = problems_of(write(tmp_path, text))
    assert "model.source" in problem and "'tiny' is neither a local directory" in problem
    assert "write ./tiny" in problem and "org/name" in problem
    (tmp_path / "tiny").mkdir()  # a directory of that name beside the file: that is what it means
    assert load_config(write(tmp_path, text)).model.source == str((tmp_path / "tiny").resolve())
    hub = load_config(write(tmp_path, MINIMAL + "model:\n  source: org/name@main\n"))
    assert hub.model.source == "org/name@main"
    (tmp_path / "org" / "name").mkdir(parents=True)
    (ambiguous,) = problems_of(write(tmp_path, MINIMAL + "model:\n  source: org/name\n"))
    assert "'org/name' is ambiguous" in ambiguous and "./org/name" in ambiguous


def test_a_bare_relative_gitops_url_is_reported_not_reinterpreted(tmp_path: Path) -> None:
    (problem,) = problems_of(write(tmp_path, MINIMAL.replace("url: ./gitops.git", "url: remote.git")))
    assert "gitops.url" in problem and "'remote.git' is neither a URL" in problem and "./remote.git" in problem
    (tmp_path / "remote.git").mkdir()  # it exists beside the file: a local repository, as git would read it
    cfg = load_config(write(tmp_path, MINIMAL.replace("url: ./gitops.git", "url: remote.git")))
    assert cfg.gitops.url == str((tmp_path / "remote.git").resolve())
    assert load_config(write(tmp_path, MINIMAL.replace("./gitops.git", "https://git.example.com/g.git"))).gitops.url
