"""The llm-inference chart as Argo CD renders it: Helm's own renderer (helm-python-sdk, offline), the env values merged
over the chart's, built-in kinds checked with kubernetes-validate, and Argo kinds with the official CRD schemas."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from pipeline.errors import TerminalError
from pipeline.gitops import CHART, Promotion, check_values, edit_values, helm_merge

helm = pytest.importorskip("helm_python", reason="needs helm-python-sdk (Helm's renderer, offline)")
kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="needs kubernetes-validate")

GITOPS = Path(__file__).resolve().parent.parent / "gitops"
CHART_DIR = GITOPS / CHART
ENVS = ("local", "staging", "prod")
K8S_VERSION = "1.33"
CRD_FILES = {
    "Rollout": "argo-rollouts-v1.9.1-rollout-crd.yaml",
    "AnalysisTemplate": "argo-rollouts-v1.9.1-analysis-template-crd.yaml",
    "Application": "argo-cd-v3.5.1-application-crd.yaml",
}
PROMOTION = Promotion(
    env="prod", model="Qwen/Qwen2.5-7B-Instruct", revision="a" * 40, artifact="qwen7b-awq-3f9a2c",
    format="awq-w4a16", quantization="awq", served_name="qwen2.5-7b-instruct",
)  # fmt: skip


def env_values(env: str, promoted: bool = True) -> dict[str, Any]:
    text = (GITOPS / "envs" / env / "values.yaml").read_text()
    if promoted:
        text = edit_values(text, PROMOTION.changes())
    return yaml.safe_load(text)


def render(values: dict[str, Any], namespace: str = "llm-prod") -> dict[str, dict[str, Any]]:
    """Every rendered object by kind/name."""
    with helm.Chart.load(str(CHART_DIR)) as chart:
        manifests = chart.render(values=values, name="llm-inference", namespace=namespace)
    docs = [doc for text in manifests.values() for doc in yaml.safe_load_all(text) if doc]
    return {f"{doc['kind']}/{doc['metadata']['name']}": doc for doc in docs}


@functools.cache
def crd_validator(crds: Path, kind: str) -> jsonschema.protocols.Validator:
    """A validator for the official CRD's schema of ``kind`` (loaded once: the Rollout CRD is large)."""
    crd = yaml.load((crds / CRD_FILES[kind]).read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    version = next(v for v in crd["spec"]["versions"] if v.get("storage"))
    schema: dict[str, Any] = version["schema"]["openAPIV3Schema"]
    return jsonschema.validators.validator_for(schema)(schema)


def validate(doc: dict[str, Any], crds: Path) -> None:
    if doc["kind"] in CRD_FILES:
        crd_validator(crds, doc["kind"]).validate(doc)
    elif doc["apiVersion"] != "keda.sh/v1alpha1":  # no schema for KEDA here; its fields are asserted below
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


@pytest.mark.parametrize("promoted", [True, False], ids=["promoted", "fresh"])
@pytest.mark.parametrize("env", ENVS)
def test_chart_renders_valid_objects_for_every_environment(env: str, promoted: bool, shared_crds: Path) -> None:
    objects = render(env_values(env, promoted), namespace=f"llm-{env}")
    kinds = {key.split("/")[0] for key in objects}
    assert {"Rollout", "Service", "PodDisruptionBudget"} <= kinds
    for doc in objects.values():
        validate(doc, shared_crds)
    if env != "local":
        assert {"AnalysisTemplate", "PersistentVolumeClaim"} <= kinds
    rollout = objects["Rollout/llm-inference"]
    assert (rollout["spec"]["replicas"] > 0) is promoted  # nothing promoted yet: no pods


def test_rollout_serves_the_promoted_artifact_from_the_cache_as_a_canary() -> None:
    values = env_values("prod")
    objects = render(values)
    rollout = objects["Rollout/llm-inference"]
    spec = rollout["spec"]
    container = spec["template"]["spec"]["containers"][0]

    assert container["args"][0] == "/models/qwen7b-awq-3f9a2c"
    assert "--quantization=awq" in container["args"] and "--served-model-name=qwen2.5-7b-instruct" in container["args"]
    assert {"--max-model-len=8192", "--gpu-memory-utilization=0.92", "--tensor-parallel-size=1"} <= set(
        container["args"]
    )
    assert (
        container["resources"]["limits"]["nvidia.com/gpu"]
        == "1"
        == container["resources"]["requests"]["nvidia.com/gpu"]
    )
    canary = spec["strategy"]["canary"]
    assert canary["steps"] == values["canary"]["steps"] == [
        {"setWeight": 10}, {"pause": {}}, {"setWeight": 50}, {"pause": {}}, {"setWeight": 100},
    ]  # fmt: skip
    assert f"Service/{canary['stableService']}" in objects
    assert f"Service/{canary['canaryService']}" in objects
    assert f"AnalysisTemplate/{canary['analysis']['templates'][0]['templateName']}" in objects
    startup = container["startupProbe"]
    assert spec["progressDeadlineSeconds"] > startup["periodSeconds"] * startup["failureThreshold"] >= 1800
    pod = spec["template"]
    assert pod["metadata"]["annotations"]["prometheus.io/scrape"] == "true"
    assert pod["spec"]["nodeSelector"] == {"cloud.google.com/gke-accelerator": "nvidia-l4"}
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert volumes["dshm"]["emptyDir"]["medium"] == "Memory"
    assert volumes["model-cache"]["persistentVolumeClaim"]["claimName"] == "model-cache"
    assert objects["PersistentVolumeClaim/model-cache"]["spec"]["accessModes"] == ["ReadWriteMany"]
    queries = [
        m["provider"]["prometheus"]["query"] for m in objects["AnalysisTemplate/llm-inference-vllm"]["spec"]["metrics"]
    ]
    assert "vllm:time_to_first_token_seconds_bucket" in queries[0] and "{{args.canary-hash}}" in queries[0]
    assert objects["PodDisruptionBudget/llm-inference"]["spec"] == {
        "minAvailable": 3, "selector": spec["selector"],
    }  # fmt: skip


def test_local_environment_runs_on_cpu_without_cluster_extras() -> None:
    objects = render(env_values("local"), namespace="llm-local")
    container = objects["Rollout/llm-inference"]["spec"]["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in str(container["resources"])
    fresh = render(env_values("local", promoted=False), namespace="llm-local")["Rollout/llm-inference"]
    assert not any(
        arg.startswith("--quantization") for arg in fresh["spec"]["template"]["spec"]["containers"][0]["args"]
    )
    assert not any(k.startswith(("AnalysisTemplate", "PersistentVolumeClaim")) for k in objects)


def test_keda_scales_the_rollout_on_waiting_requests_when_enabled() -> None:
    values = helm_merge(env_values("prod"), {"autoscaling": {"enabled": True}})
    objects = render(values)
    scaled = objects["ScaledObject/llm-inference"]
    assert scaled["spec"]["scaleTargetRef"] == {
        "apiVersion": "argoproj.io/v1alpha1",
        "kind": "Rollout",
        "name": "llm-inference",
    }
    assert "vllm:num_requests_waiting" in scaled["spec"]["triggers"][0]["metadata"]["query"]
    assert "replicas" not in objects["Rollout/llm-inference"]["spec"]  # KEDA owns the count


@pytest.mark.parametrize("env", ENVS)
def test_pipeline_merge_is_helms_merge(env: str) -> None:
    values = env_values(env)
    chart_values = yaml.safe_load((CHART_DIR / "values.yaml").read_text())
    with helm.Chart.load(str(CHART_DIR)) as chart:
        assert helm_merge(chart_values, values) == chart.merge_values(values)


BAD_VALUES = [
    ({"model": {"revision": "main"}}, "model.revision"),
    ({"model": {"quantization": "int3"}}, "model.quantization"),
    ({"replicas": "two"}, "replicas"),
    ({"canary": {"steps": [{"setWeight": 101}]}}, "canary.steps.0.setWeight"),
    ({"canary": {"steps": [{"setWieght": 10}]}}, "canary.steps.0"),
    ({"gpu": {"count": -1}}, "gpu.count"),
    ({"replcias": 3}, "replcias"),
]


@pytest.mark.parametrize(("bad", "key"), BAD_VALUES, ids=[k for _, k in BAD_VALUES])
def test_schema_rejects_bad_values_in_helm_and_in_the_pipeline(bad: dict[str, Any], key: str) -> None:
    good = env_values("prod")
    values = helm_merge(good, bad)
    with helm.Chart.load(str(CHART_DIR)) as chart:
        chart.validate_schema(good)  # a good candidate passes Helm's own check
        with pytest.raises(helm.HelmValuesError):
            chart.validate_schema(values)
    check_values(yaml.safe_dump(good), CHART_DIR, "envs/prod/values.yaml")
    with pytest.raises(TerminalError) as caught:
        check_values(yaml.safe_dump(values), CHART_DIR, "envs/prod/values.yaml")
    assert key in str(caught.value)


def test_argocd_applications_are_valid_and_watch_their_environment(shared_crds: Path) -> None:
    for env in ("staging", "prod"):
        app = yaml.safe_load((GITOPS / "argocd" / f"application-{env}.yaml").read_text())
        crd_validator(shared_crds, "Application").validate(app)
        source = app["spec"]["source"]
        assert source["path"] == CHART
        (values_file,) = source["helm"]["valueFiles"]
        assert (GITOPS / CHART / values_file).resolve() == GITOPS / "envs" / env / "values.yaml"
        assert app["spec"]["syncPolicy"]["automated"] == {"prune": True, "selfHeal": True}
        assert app["spec"]["destination"]["namespace"] == f"llm-{env}"
    project = yaml.safe_load((GITOPS / "argocd" / "project.yaml").read_text())
    assert project["kind"] == "AppProject" and project["metadata"]["name"] == app["spec"]["project"]


def test_pipeline_rbac_is_valid_and_least_privilege() -> None:
    docs = [d for d in yaml.safe_load_all((GITOPS / "rbac" / "pipeline.yaml").read_text()) if d]
    rules = []
    for doc in docs:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        rules += doc.get("rules", [])
    granted = {(res, verb) for rule in rules for res in rule["resources"] for verb in rule["verbs"]}
    assert ("rollouts/status", "patch") in granted and ("rollouts", "patch") not in granted  # never the spec
    assert ("applications", "patch") in granted and ("jobs", "create") in granted and ("leases", "create") in granted
    assert ("nodes", "list") in granted and ("pods", "list") in granted
    assert not any("*" in rule["verbs"] or "*" in rule["resources"] for rule in rules)
    assert not any(res == "secrets" for res, _ in granted)


def test_the_validators_refuse_damaged_manifests(shared_crds: Path) -> None:
    objects = render(env_values("prod"))
    rollout, service = objects["Rollout/llm-inference"], objects["Service/llm-inference-canary"]
    rollout["spec"]["strategy"]["canary"]["steps"][0]["setWeight"] = "ten"
    with pytest.raises(jsonschema.ValidationError, match="'ten' is not of type 'integer'"):
        validate(rollout, shared_crds)
    service["spec"]["portz"] = service["spec"].pop("ports")
    with pytest.raises(jsonschema.ValidationError, match="portz"):
        validate(service, shared_crds)
