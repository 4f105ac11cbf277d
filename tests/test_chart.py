"""The llm-inference chart as Argo CD renders it: Helm's own renderer (helm-python-sdk, offline), the env values merged
over the chart's, built-in kinds checked with kubernetes-validate, and Argo kinds with the official CRD schemas."""

from __future__ import annotations

import functools
import math
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from pipeline.checks import error_ratio_query, ttft_p95_query
from pipeline.errors import TerminalError
from pipeline.gitops import CHART, Promotion, check_values, edit_values, helm_merge

helm = pytest.importorskip("helm_python", reason="needs helm-python-sdk (Helm's renderer, offline)")
kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="needs kubernetes-validate")

GITOPS = Path(__file__).resolve().parent.parent / "gitops"
CHART_DIR = GITOPS / CHART
ENVS = ("local", "staging", "prod", "sandbox")
K8S_VERSION = "1.33"
CRD_FILES = {
    "Rollout": "argo-rollouts-v1.9.1-rollout-crd.yaml",
    "AnalysisTemplate": "argo-rollouts-v1.9.1-analysis-template-crd.yaml",
    "Application": "argo-cd-v3.5.1-application-crd.yaml",
    "HTTPRoute": "gateway-api-v1.6.1-httproute-crd.yaml",
    "ScaledObject": "keda-v2.20.2-scaledobject-crd.yaml",
    "PodMonitor": "prometheus-operator-v0.93.0-podmonitor-crd.yaml",
    "ServiceMonitor": "prometheus-operator-v0.93.0-servicemonitor-crd.yaml",
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
def crd_api_versions(crds: Path, kind: str) -> frozenset[str]:
    """The apiVersions the official CRD of ``kind`` serves."""
    crd = yaml.load((crds / CRD_FILES[kind]).read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    return frozenset(f"{crd['spec']['group']}/{v['name']}" for v in crd["spec"]["versions"] if v.get("served"))


@functools.cache
def crd_validator(crds: Path, kind: str) -> jsonschema.protocols.Validator:
    """A validator for the official CRD's schema of ``kind`` (loaded once: the Rollout CRD is large)."""
    crd = yaml.load((crds / CRD_FILES[kind]).read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    assert crd["spec"]["names"]["kind"] == kind
    version = next(v for v in crd["spec"]["versions"] if v.get("storage"))
    schema: dict[str, Any] = version["schema"]["openAPIV3Schema"]
    return jsonschema.validators.validator_for(schema)(schema)


def validate(doc: dict[str, Any], crds: Path) -> None:
    """Built-in kinds with Kubernetes' own schema (strict: unknown fields fail), the rest with their official CRD."""
    if doc["kind"] in CRD_FILES:
        assert doc["apiVersion"] in crd_api_versions(crds, doc["kind"]), f"{doc['kind']}: {doc['apiVersion']}"
        crd_validator(crds, doc["kind"]).validate(doc)
    else:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


# Every optional feature switched on at once, with the pod fields clusters routinely need.
ALL_FEATURES: dict[str, Any] = {
    "autoscaling": {"enabled": True},
    "trafficRouting": {
        "type": "gatewayAPI",
        "gatewayAPI": {
            "parentRefs": [{"name": "inference", "namespace": "gateways"}],
            "hostnames": ["llm.example.com"],
        },
    },
    "metrics": {"podMonitor": {"enabled": True, "labels": {"release": "kube-prometheus-stack"}}},
    "canary": {"analysis": {"enabled": True}},
    "runtimeClassName": "nvidia",
    "priorityClassName": "inference-high",
    "imagePullSecrets": [{"name": "registry-credentials"}],
    "affinity": {
        "podAntiAffinity": {
            "preferredDuringSchedulingIgnoredDuringExecution": [
                {
                    "weight": 100,
                    "podAffinityTerm": {
                        "topologyKey": "kubernetes.io/hostname",
                        "labelSelector": {"matchLabels": {"app.kubernetes.io/name": "llm-inference"}},
                    },
                }
            ]
        }
    },
    "podAnnotations": {"cluster-autoscaler.kubernetes.io/safe-to-evict": "false"},
    "extraEnv": [
        {"name": "VLLM_LOGGING_LEVEL", "value": "INFO"},
        {"name": "NODE", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
    ],
}


@pytest.mark.parametrize("features", [False, True], ids=["defaults", "all-features"])
@pytest.mark.parametrize("promoted", [True, False], ids=["promoted", "fresh"])
@pytest.mark.parametrize("env", ENVS)
def test_chart_renders_valid_objects_for_every_environment(
    env: str, promoted: bool, features: bool, shared_crds: Path
) -> None:
    values = env_values(env, promoted)
    if features:
        values = helm_merge(values, ALL_FEATURES)
    with helm.Chart.load(str(CHART_DIR)) as chart:
        chart.validate_schema(values)
    objects = render(values, namespace=f"llm-{env}")
    kinds = {key.split("/")[0] for key in objects}
    assert {"Rollout", "Service", "PodDisruptionBudget"} <= kinds
    for doc in objects.values():
        validate(doc, shared_crds)
    if env != "local":
        assert {"AnalysisTemplate", "PersistentVolumeClaim", "PodMonitor"} <= kinds
    if features:
        assert {"HTTPRoute", "PodMonitor", "AnalysisTemplate"} <= kinds
        assert ("ScaledObject" in kinds) is promoted  # nothing promoted: KEDA must not start pods with no weights
    project = yaml.safe_load((GITOPS / "argocd" / "project.yaml").read_text())
    allowed = {(r["group"], r["kind"]) for r in project["spec"]["namespaceResourceWhitelist"]}
    for doc in objects.values():
        group = doc["apiVersion"].rpartition("/")[0]
        assert (group, doc["kind"]) in allowed, f"the AppProject would refuse to sync {doc['kind']}"
    replicas = objects["Rollout/llm-inference"]["spec"].get("replicas")
    if features and promoted:
        assert replicas is None  # KEDA owns the count
    else:
        assert (replicas > 0) is promoted  # nothing promoted yet: no pods


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


MATCHERS = re.compile(r'(\w+)="([^"]*)"')


def selects(query: str, series: dict[str, str]) -> bool:
    """Whether the one selector of a PromQL query (``name="value"`` matchers only) selects ``series``."""
    matchers = MATCHERS.findall(query[query.index("{") : query.index("}")])
    return all(series.get(name) == value for name, value in matchers)


def test_users_reach_every_pod_and_checks_keep_the_pinned_services() -> None:
    objects = render(env_values("prod"))
    rollout = objects["Rollout/llm-inference"]
    pods = rollout["spec"]["template"]["metadata"]["labels"]
    users = objects["Service/llm-inference"]["spec"]
    assert users["selector"] == pods and "rollouts-pod-template-hash" not in users["selector"]  # canary + stable
    assert users["ports"] == [{"name": "http", "port": 8000, "targetPort": "http"}]
    canary = rollout["spec"]["strategy"]["canary"]
    assert {canary["stableService"], canary["canaryService"]} == {"llm-inference-stable", "llm-inference-canary"}
    assert "trafficRouting" not in canary and not any(k.startswith("HTTPRoute/") for k in objects)


def test_gateway_api_routing_splits_between_the_stable_and_canary_services(shared_crds: Path) -> None:
    objects = render(helm_merge(env_values("prod"), {"trafficRouting": ALL_FEATURES["trafficRouting"]}))
    canary = objects["Rollout/llm-inference"]["spec"]["strategy"]["canary"]
    plugin = canary["trafficRouting"]["plugins"]["argoproj-labs/gatewayAPI"]
    route = objects[f"HTTPRoute/{plugin['httpRoute']}"]
    assert plugin["namespace"] == "llm-prod"
    assert route["spec"]["parentRefs"] == [{"name": "inference", "namespace": "gateways"}]
    (rule,) = route["spec"]["rules"]
    backends = {b["name"]: b for b in rule["backendRefs"]}
    assert set(backends) == {canary["stableService"], canary["canaryService"]}
    assert all(f"Service/{name}" in objects and b["port"] == 8000 for name, b in backends.items())
    assert backends[canary["stableService"]]["weight"] == 100 and backends[canary["canaryService"]]["weight"] == 0
    assert "Service/llm-inference" not in objects  # users come through the Gateway, not around the router
    assert "dynamicStableScale" not in canary  # stable keeps full scale unless asked
    scaled_down = {"trafficRouting": {**ALL_FEATURES["trafficRouting"], "dynamicStableScale": True}}
    rollout = render(helm_merge(env_values("prod"), scaled_down))["Rollout/llm-inference"]
    validate(rollout, shared_crds)
    assert rollout["spec"]["strategy"]["canary"]["dynamicStableScale"] is True
    with helm.Chart.load(str(CHART_DIR)) as chart, pytest.raises(helm.HelmValuesError):  # no Gateway named
        chart.validate_schema(helm_merge(env_values("prod"), {"trafficRouting": {"type": "gatewayAPI"}}))


def test_prometheus_keeps_the_pod_template_hash_on_vllm_series() -> None:
    objects = render(env_values("prod"))
    monitor = objects["PodMonitor/llm-inference"]["spec"]
    pod = objects["Rollout/llm-inference"]["spec"]["template"]
    assert "rollouts-pod-template-hash" in monitor["podTargetLabels"]
    assert monitor["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    (endpoint,) = monitor["podMetricsEndpoints"]
    assert endpoint["port"] in {p["name"] for p in pod["spec"]["containers"][0]["ports"]}
    assert endpoint["path"] == "/metrics"
    assert not any(k.startswith("PodMonitor/") for k in render(env_values("local"), namespace="llm-local"))


def analysis_outcome(metric: dict[str, Any], result: list[float]) -> str:
    """What Argo Rollouts makes of one measurement: both conditions set, so neither holding is Inconclusive.

    The conditions use the expr language's ``&&``, ``!`` and ``isNaN``; evaluated here with Python's equivalents.
    """

    def holds(condition: str) -> bool:
        python = condition.replace("&&", " and ").replace("||", " or ").replace("!isNaN(", "not isNaN(")
        return bool(eval(python, {"len": len, "isNaN": math.isnan, "result": result}))

    if holds(metric["failureCondition"]):
        return "Failed"
    return "Successful" if holds(metric["successCondition"]) else "Inconclusive"


def test_analysis_reads_a_missing_5xx_series_as_zero_and_no_requests_as_inconclusive() -> None:
    metrics = {
        m["name"]: m for m in render(env_values("prod"))["AnalysisTemplate/llm-inference-vllm"]["spec"]["metrics"]
    }
    args = ("{{args.namespace}}", "{{args.canary-hash}}", "2m")
    assert metrics["error-ratio"]["provider"]["prometheus"]["query"] == error_ratio_query(*args)  # the checks' query
    assert metrics["ttft-p95"]["provider"]["prometheus"]["query"] == ttft_p95_query(*args)
    errors, ttft = metrics["error-ratio"], metrics["ttft-p95"]
    assert analysis_outcome(errors, [0.0]) == "Successful"  # no 5xx series yet: `or vector(0)` gives 0 errors
    assert analysis_outcome(errors, [0.2]) == "Failed"
    assert analysis_outcome(errors, []) == "Inconclusive"  # no requests at all
    assert analysis_outcome(errors, [math.nan]) == "Inconclusive"  # 0/0: counters exist, nothing in the window
    assert analysis_outcome(ttft, [0.3]) == "Successful" and analysis_outcome(ttft, [0.9]) == "Failed"
    assert analysis_outcome(ttft, []) == analysis_outcome(ttft, [math.nan]) == "Inconclusive"
    for metric in metrics.values():  # an idle start is tolerated, not failed: a delay, then a few inconclusive
        assert metric["initialDelay"] == "2m" and metric["inconclusiveLimit"] >= 1


def test_cache_claim_probes_and_pod_fields_come_from_values() -> None:
    for env in ("staging", "prod"):
        claim = render(env_values(env), namespace=f"llm-{env}")["PersistentVolumeClaim/model-cache"]["spec"]
        assert claim["accessModes"] == ["ReadWriteMany"] and claim["storageClassName"]  # never the RWO default
    values = helm_merge(env_values("prod"), {**ALL_FEATURES, "cache": {"accessModes": ["ReadOnlyMany"]}})
    objects = render(values)
    assert objects["PersistentVolumeClaim/model-cache"]["spec"]["accessModes"] == ["ReadOnlyMany"]
    pod = objects["Rollout/llm-inference"]["spec"]["template"]
    spec, container = pod["spec"], pod["spec"]["containers"][0]
    assert (spec["runtimeClassName"], spec["priorityClassName"]) == ("nvidia", "inference-high")
    assert spec["imagePullSecrets"] == [{"name": "registry-credentials"}]
    assert spec["affinity"] == ALL_FEATURES["affinity"]
    assert pod["metadata"]["annotations"]["cluster-autoscaler.kubernetes.io/safe-to-evict"] == "false"
    assert container["env"][1:] == ALL_FEATURES["extraEnv"] and container["env"][0]["name"] == "HF_HUB_OFFLINE"
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["timeoutSeconds"] >= 5  # not Kubernetes' 1 s default on a busy /health
    plain = render(env_values("prod"))["Rollout/llm-inference"]["spec"]["template"]["spec"]
    assert not {"runtimeClassName", "priorityClassName", "imagePullSecrets", "affinity"} & set(plain)


def test_keda_scales_the_rollout_on_this_models_waiting_requests_only() -> None:
    values = helm_merge(env_values("prod"), {"autoscaling": {"enabled": True}})
    objects = render(values)
    scaled = objects["ScaledObject/llm-inference"]
    assert scaled["spec"]["scaleTargetRef"] == {
        "apiVersion": "argoproj.io/v1alpha1",
        "kind": "Rollout",
        "name": "llm-inference",
    }
    assert "replicas" not in objects["Rollout/llm-inference"]["spec"]  # KEDA owns the count
    query = scaled["spec"]["triggers"][0]["metadata"]["query"]
    assert query.startswith("sum(vllm:num_requests_waiting{")
    ours = {"namespace": "llm-prod", "model_name": "qwen2.5-7b-instruct", "app_kubernetes_io_instance": "llm-inference"}
    assert selects(query, ours)
    assert not selects(query, {**ours, "namespace": "llm-staging"})  # the same model in another environment
    assert not selects(query, {**ours, "model_name": "other", "app_kubernetes_io_instance": "other"})  # a neighbour
    assert not selects(query, {**ours, "app_kubernetes_io_instance": "other"})  # another release, same served name
    fresh = render(helm_merge(env_values("prod", promoted=False), {"autoscaling": {"enabled": True}}))
    assert "ScaledObject/llm-inference" not in fresh and fresh["Rollout/llm-inference"]["spec"]["replicas"] == 0


def replica_ignore_problem(app: dict[str, Any], values: dict[str, Any]) -> str | None:
    """Why ``app`` and its environment's values disagree on who owns the Rollout's replicas (None: they agree)."""
    ignored = any(
        d.get("kind") == "Rollout" and d.get("group") == "argoproj.io" and "/spec/replicas" in d.get("jsonPointers", [])
        for d in app["spec"].get("ignoreDifferences", [])
    )
    keda = bool(values.get("autoscaling", {}).get("enabled"))
    if keda and not ignored:
        return (
            "autoscaling is on but the Application does not ignore the Rollout's /spec/replicas: self-heal fights KEDA"
        )
    if ignored and not keda:
        return (
            "the Application ignores the Rollout's /spec/replicas with autoscaling off: a replicas change never syncs"
        )
    return None


def readme_replicas_entry() -> dict[str, Any]:
    """The ignoreDifferences entry gitops/README.md tells people to add when they turn autoscaling on."""
    text = (GITOPS / "README.md").read_text()
    block = text[text.index("## Autoscaling") :].split("```yaml\n", 1)[1].split("```", 1)[0]
    (entry,) = yaml.safe_load(block)
    return dict(entry)


def test_argo_cd_ignores_the_rollouts_replicas_exactly_when_keda_owns_them(shared_crds: Path) -> None:
    for env in ("staging", "prod"):  # the repository as it is: each Application agrees with its env's values
        app = yaml.safe_load((GITOPS / "argocd" / f"application-{env}.yaml").read_text())
        assert replica_ignore_problem(app, env_values(env)) is None, env
        assert "RespectIgnoreDifferences=true" in app["spec"]["syncPolicy"]["syncOptions"]
        route = next(d for d in app["spec"]["ignoreDifferences"] if d["kind"] == "HTTPRoute")
        assert route["jqPathExpressions"] == [".spec.rules[].backendRefs[].weight"]  # the plugin's weights
    app = yaml.safe_load((GITOPS / "argocd" / "application-prod.yaml").read_text())
    keda = helm_merge(env_values("prod"), {"autoscaling": {"enabled": True}})
    problem = replica_ignore_problem(app, keda)
    assert problem is not None and "self-heal fights KEDA" in problem  # turned on without the Application: caught
    app["spec"]["ignoreDifferences"].append(readme_replicas_entry())  # as gitops/README.md says
    crd_validator(shared_crds, "Application").validate(app)
    assert replica_ignore_problem(app, keda) is None
    assert "replicas" not in render(keda)["Rollout/llm-inference"]["spec"]
    problem = replica_ignore_problem(app, env_values("prod"))  # and the entry left behind once KEDA is off again
    assert problem is not None and "never syncs" in problem


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
    ({"cache": {"accessModes": ["ReadWriteSometimes"]}}, "cache.accessModes.0"),
    ({"trafficRouting": {"type": "istio"}}, "trafficRouting.type"),
    ({"extraEnv": [{"value": "no name"}]}, "extraEnv.0"),
    ({"probes": {"liveness": {"timeoutSeconds": 0}}}, "probes.liveness.timeoutSeconds"),
    ({"imagePullSecrets": ["registry-credentials"]}, "imagePullSecrets.0"),
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
    extras = render(helm_merge(env_values("prod"), ALL_FEATURES))
    scaled, route, monitor = (
        extras[k] for k in ("ScaledObject/llm-inference", "HTTPRoute/llm-inference", "PodMonitor/llm-inference")
    )
    scaled["spec"]["minReplicaCount"] = "four"
    with pytest.raises(jsonschema.ValidationError, match="'four' is not of type 'integer'"):
        validate(scaled, shared_crds)
    route["spec"]["rules"][0]["backendRefs"][0]["weight"] = -1
    with pytest.raises(jsonschema.ValidationError, match="-1 is less than the minimum of 0"):
        validate(route, shared_crds)
    monitor["spec"]["podTargetLabels"] = "rollouts-pod-template-hash"
    with pytest.raises(jsonschema.ValidationError, match="is not of type 'array'"):
        validate(monitor, shared_crds)
    monitor["apiVersion"] = "monitoring.coreos.com/v2"
    with pytest.raises(AssertionError, match=r"PodMonitor: monitoring\.coreos\.com/v2"):
        validate(monitor, shared_crds)
