"""promotion.yaml -> typed settings. The only reader of configuration.

One file describes the GitOps repo, the model defaults, and each environment a model is promoted to. It is
validated in full before anything runs; every finding names the file, the line, the key and what is
expected, and all findings are reported at once.

Example:
    >>> cfg = load_config("examples/local/promotion.yaml")  # doctest: +SKIP
    >>> cfg.environments["local"].executor
    'local'
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from ruamel.yaml import YAML
from ruamel.yaml.error import MarkedYAMLError

from pipeline.errors import ConfigError
from pipeline.secrets import has_credentials, redact

ENV_NAME = r"^[a-z0-9]([-a-z0-9]{0,38}[a-z0-9])?$"
K8S_NAME = r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$"
URL_SCHEMES = ("https://", "http://", "ssh://", "git://", "file://")

PositiveFloat = Annotated[float, Field(gt=0)]
PositiveInt = Annotated[int, Field(gt=0)]
Fraction = Annotated[float, Field(ge=0, le=1)]
LatencyKey = Literal[
    "ttft_p50", "ttft_p90", "ttft_p95", "ttft_p99",
    "itl_p50", "itl_p90", "itl_p95", "itl_p99",
    "e2e_p50", "e2e_p90", "e2e_p95", "e2e_p99",
]  # fmt: skip


class Strict(BaseModel):
    """Base for every section: unknown keys are errors (a typo must not be silently ignored)."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def _base_dir(info: ValidationInfo) -> Path:
    context = info.context or {}
    return Path(context.get("base_dir", "."))


class GitOpsRepo(Strict):
    """Where the GitOps repo lives. Credentials come from the environment, never from this file."""

    url: str = Field(description="https/ssh/file URL, or a path to a local (bare) repository")
    branch: str = "main"
    token_env: str = Field("GITOPS_TOKEN", description="environment variable holding an https token")
    mode: Literal["push", "pull-request"] = "push"
    author_name: str = "modelctl"
    author_email: str = "modelctl@localhost"

    @field_validator("url")
    @classmethod
    def _url(cls, value: str, info: ValidationInfo) -> str:
        if has_credentials(value):
            raise ValueError(
                "must not contain credentials; put the token in the environment variable named by "
                "gitops.token_env instead"
            )
        if value.startswith(URL_SCHEMES) or re.match(r"^[\w.-]+@[\w.-]+:", value):
            return value
        path = (_base_dir(info) / Path(value).expanduser()).resolve()
        if not value.startswith(("./", "../", "/", "~")) and not path.exists():
            raise ValueError(
                f"{value!r} is neither a URL (https://, ssh://, file://, git@host:) nor an existing path "
                f"(no {path}); write ./{value} for a local repository relative to this file, or its full URL"
            )
        return str(path)


class Calibration(Strict):
    dataset: str | None = Field(None, description="local JSONL/text file or Hub dataset id; None = shipped")
    samples: PositiveInt = 64
    max_seq_len: PositiveInt = 256


UNQUANTIZED_IGNORES = ("bits", "group_size", "symmetric", "ignore", "calibration")


class Quantization(Strict):
    """The default quantization recipe; `modelctl promote --method` may override the method.

    ``method: none`` builds an unquantized artifact (the source's weights, optionally cast to ``dtype``): for
    engines that cannot serve 4-bit weights, such as vLLM's CPU build without AVX-512.
    """

    method: Literal["awq", "gptq", "none"] = "awq"
    backend: Literal["llmcompressor", "autoawq"] = "llmcompressor"
    bits: Literal[4] = 4
    group_size: Literal[32, 64, 128] = 128
    symmetric: bool = True
    ignore: list[str] = Field(default_factory=lambda: ["lm_head"])
    calibration: Calibration = Calibration()
    dtype: Literal["bfloat16", "float16", "float32"] | None = Field(
        None, description="method none only: cast the weights to this dtype (None: keep the source's)"
    )

    @model_validator(mode="after")
    def _backend_supports_method(self) -> Quantization:
        if self.backend == "autoawq" and self.method != "awq":
            raise ValueError("backend 'autoawq' only does method 'awq'; use backend 'llmcompressor' for gptq")
        if self.method != "none" and self.dtype is not None:
            raise ValueError(
                f"dtype applies to method 'none' only ({self.method} keeps the source's dtype); remove dtype, "
                "or set method: none for an unquantized artifact"
            )
        if self.method == "none":
            fields = Quantization.model_fields
            given = [
                key
                for key in UNQUANTIZED_IGNORES
                if key in self.model_fields_set
                and getattr(self, key) != fields[key].get_default(call_default_factory=True)
            ]
            if given:
                verb, them = ("does", "it") if len(given) == 1 else ("do", "them")
                raise ValueError(
                    f"method 'none' quantizes nothing, so {', '.join(given)} {verb} not apply; remove {them}, "
                    "or choose method awq or gptq"
                )
        return self


class ModelSettings(Strict):
    source: str | None = Field(None, description="default model reference: org/name[@rev] or a local dir")
    served_name: str | None = None
    quantization: Quantization = Quantization()

    @field_validator("source")
    @classmethod
    def _local_source(cls, value: str | None, info: ValidationInfo) -> str | None:
        """A reference that looks like a path (./, ../, /, ~) is a local directory, relative to this file.

        A bare name is never silently taken for the Hub: it is a directory beside this file if one exists, else an
        error; ``org/name`` is a Hub id unless a directory of that name is here too (then it is ambiguous).
        """
        if value is None:
            return value
        path = (_base_dir(info) / Path(value).expanduser()).resolve()
        if value.startswith(("./", "../", "/", "~")):
            return str(path)
        hub_like = re.fullmatch(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*(@[\w./-]+)?", value) is not None
        if hub_like and path.is_dir():
            raise ValueError(
                f"{value!r} is ambiguous: a Hub repo id and the directory {path}; write ./{value} for the "
                "directory, or move it away to mean the Hub repo"
            )
        if hub_like:
            return value
        if path.is_dir():
            return str(path)
        raise ValueError(
            f"{value!r} is neither a local directory (no {path}) nor a Hub repo id (org/name[@revision]); "
            f"write ./{value} for a directory relative to this file, or the full org/name of the Hub repo"
        )

    trust_remote_code: bool = False
    allow_pickle: bool = False
    hub_token_env: str = "HF_TOKEN"


class ArgoCDApp(Strict):
    application: Annotated[str, Field(pattern=K8S_NAME)]
    namespace: Annotated[str, Field(pattern=K8S_NAME)] = "argocd"


class RolloutRef(Strict):
    name: Annotated[str, Field(pattern=K8S_NAME)]
    namespace: Annotated[str, Field(pattern=K8S_NAME)]


class Cache(Strict):
    """Where preloaded weights live: a directory here, or the PVC the inference pods mount."""

    root: str = Field(description="cache directory (the PVC's mount path when running in a Job)")
    pvc: Annotated[str, Field(pattern=K8S_NAME)] | None = None

    @field_validator("root")
    @classmethod
    def _root(cls, value: str, info: ValidationInfo) -> str:
        return str((_base_dir(info) / value).resolve()) if not value.startswith("/") else value


class Toleration(Strict):
    key: str
    operator: Literal["Equal", "Exists"] = "Exists"
    value: str | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None


class GpuPool(Strict):
    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[Toleration] = Field(default_factory=list)
    gpus_per_replica: Annotated[int, Field(ge=0)] = 1
    resource: str = "nvidia.com/gpu"
    max_nodes: Annotated[int, Field(ge=1)] | None = Field(
        None,
        description="an autoscaled pool's maximum node count (the node pool's / cluster autoscaler's max); the GPU "
        "preflight then counts the nodes the pool can still add. None: only the Ready nodes count",
    )
    gpus_per_node: Annotated[int, Field(ge=1)] | None = Field(
        None, description="GPUs (of `resource`) each node of the pool has; needed with max_nodes"
    )

    @model_validator(mode="after")
    def _growth(self) -> GpuPool:
        if self.max_nodes is not None and self.gpus_per_node is None:
            raise ValueError(
                "max_nodes needs gpus_per_node: how many GPUs a node the autoscaler adds brings (a pool at zero "
                "nodes shows none)"
            )
        if self.max_nodes is not None and self.gpus_per_node is not None and self.gpus_per_node < self.gpus_per_replica:
            raise ValueError(
                f"gpus_per_node {self.gpus_per_node} < gpus_per_replica {self.gpus_per_replica}: a replica's GPUs "
                "must all be on one node, so no node of this pool could run one"
            )
        return self


class JobSettings(Strict):
    """How pipeline steps run as Kubernetes Jobs on the GPU pool (executor: kubernetes)."""

    service_account: Annotated[str, Field(pattern=K8S_NAME)] = "modelctl"
    hub_token_secret: Annotated[str, Field(pattern=K8S_NAME)] | None = Field(
        "hf-token", description="Secret whose key `token` holds the Hub token; None for public models"
    )
    backoff_limit: Annotated[int, Field(ge=0)] = 1
    ttl_seconds_after_finished: Annotated[int, Field(ge=0)] = 3600
    timeout_s: PositiveFloat = 7200.0
    cpu: str = "4"
    memory: str = "32Gi"


class EvalPolicy(Strict):
    """Defaults for metrics whose suite entry sets no policy of its own."""

    max_regression_abs: Annotated[float, Field(ge=0)] | None = None
    max_regression_rel: Annotated[float, Field(ge=0)] | None = None
    stderr_k: Annotated[float, Field(ge=0)] | None = None


class EvalGate(Strict):
    suite: str = Field(description="a suite name under evaluations/suites/, or a path to a suite YAML")
    policy: EvalPolicy = EvalPolicy()


class LoadProfile(Strict):
    """How load is applied: exactly one of `rate` (open loop) or `concurrency` (closed loop)."""

    rate: PositiveFloat | None = None
    concurrency: PositiveInt | None = None
    poisson: bool = False
    duration_s: PositiveFloat = 20.0
    max_requests: PositiveInt | None = None
    warmup_s: Annotated[float, Field(ge=0)] = 2.0
    prompt_tokens: PositiveInt = 64
    max_tokens: PositiveInt = 32
    api: Literal["chat", "completions"] = "chat"

    @model_validator(mode="after")
    def _one_mode(self) -> LoadProfile:
        if (self.rate is None) == (self.concurrency is None):
            raise ValueError("set exactly one of 'rate' (requests/s) or 'concurrency' (parallel streams)")
        return self


class Slo(Strict):
    latency_ms: dict[LatencyKey, PositiveFloat] = Field(default_factory=dict)
    max_error_rate: Fraction = 0.01
    min_rate_ratio: Annotated[float, Field(gt=0, le=1)] = 0.95
    min_requests: PositiveInt = 20


class LoadGate(Strict):
    profile: LoadProfile
    slo: Slo


class CapacitySweep(Strict):
    """How one capacity sweep searches for goodput: a geometric ramp from `start_rps`, then bisection.

    Each rate is held for `duration_s` (longer when the SLO's percentiles need more samples) after `warmup_s`;
    one sweep stops at `budget_s` (inconclusive if the goodput is not bracketed by then). See
    pipeline/loadtest/capacity.py for the stopping rules.
    """

    start_rps: PositiveFloat = 1.0
    growth: Annotated[float, Field(gt=1)] = 2.0
    max_rps: PositiveFloat = 256.0
    resolution: Annotated[float, Field(gt=0, le=1)] = 0.1
    duration_s: PositiveFloat = 10.0
    warmup_s: Annotated[float, Field(ge=0)] = 1.0
    budget_s: PositiveFloat = 300.0
    repetitions: Annotated[int, Field(ge=3)] = 3

    @model_validator(mode="after")
    def _range(self) -> CapacitySweep:
        if self.max_rps < self.start_rps:
            raise ValueError(f"max_rps {self.max_rps:g} is below start_rps {self.start_rps:g}")
        return self


class CapacityPolicy(Strict):
    """The capacity gate and plan: candidate vs incumbent goodput (requests/s one replica serves within the SLO)."""

    peak_rps: PositiveFloat | None = Field(None, description="the environment's peak request rate, for the plan")
    gpu_hour_cost: Annotated[float, Field(ge=0)] | None = Field(None, description="price of one GPU for an hour")
    max_replicas: PositiveInt | None = Field(None, description="the most replicas the environment may run")
    max_regression: Annotated[float, Field(ge=0, lt=1)] = Field(
        0.1, description="the largest drop of median goodput, as a fraction of the incumbent's, that passes"
    )
    stderr_k: Annotated[float, Field(ge=0)] = Field(
        2.0, description="a larger drop still passes while within stderr_k x the combined standard error"
    )
    write_replicas: bool = Field(
        False, description="write the replicas needed at peak (or KEDA's maxReplicas) into the promotion commit"
    )
    sweep: CapacitySweep = CapacitySweep()

    @model_validator(mode="after")
    def _replicas_need_peak(self) -> CapacityPolicy:
        if self.write_replicas and self.peak_rps is None:
            raise ValueError("write_replicas needs peak_rps: the replicas written are those needed at the peak rate")
        return self


class Gates(Strict):
    eval: EvalGate | None = None
    load: LoadGate | None = None
    capacity: CapacityPolicy | None = None

    @model_validator(mode="after")
    def _capacity_needs_load(self) -> Gates:
        if self.capacity is not None and self.load is None:
            raise ValueError("capacity needs load: the sweep holds the load gate's SLO and uses its profile")
        return self


CheckKind = Literal["load", "metrics"]


def _default_checks() -> list[CheckKind]:
    return ["load"]


class CanaryPolicy(Strict):
    """How each canary step is judged: which checks, how many passes in a row, and the time limits."""

    checks: list[CheckKind] = Field(default_factory=_default_checks)
    consecutive_passes: PositiveInt = 2
    check_interval_s: PositiveFloat = 10.0
    step_timeout_s: PositiveFloat = 600.0
    sync_timeout_s: PositiveFloat = 300.0
    prometheus_url: str | None = None
    max_ttft_ratio_vs_stable: Annotated[float, Field(ge=1)] = 1.25
    metrics_window: str = Field("2m", pattern=r"^[0-9]+[smh]$")


class Reevaluation(Strict):
    """What the scheduled re-evaluation of a live environment does when the live model regressed."""

    rollback_on_regression: bool = False


class Approval(Strict):
    required: bool = False
    timeout_s: PositiveFloat = 86400.0


class GuardSettings(Strict):
    """What `modelctl guard` does with a change to the environment's values that the pipeline did not make."""

    enforce: bool = Field(
        False, description="revert an unpinned revision or an artifact missing from the store (else: unvetted)"
    )


class Environment(Strict):
    """One place a model is promoted to."""

    values_file: str = Field(description="path of the Helm values file inside the GitOps repo")
    executor: Literal["local", "kubernetes"] = "local"
    argocd: ArgoCDApp | None = None
    rollout: RolloutRef | None = None
    endpoint: str | None = Field(None, description="base URL of the canary Service's OpenAI API")
    image: str | None = Field(None, description="pipeline image for Kubernetes Jobs")
    jobs: JobSettings = JobSettings()
    cache: Cache
    gpu_pool: GpuPool = GpuPool()
    gates: Gates = Gates()
    canary: CanaryPolicy = CanaryPolicy()
    approval: Approval = Approval()
    reevaluate: Reevaluation = Reevaluation()
    requires: list[str] = Field(default_factory=list, description="environments that must come first")
    guard: GuardSettings = GuardSettings()

    @field_validator("values_file")
    @classmethod
    def _relative_in_repo(cls, value: str) -> str:
        if value.startswith("/") or ".." in Path(value).parts:
            raise ValueError("must be a relative path inside the GitOps repo, without '..'")
        if not value.endswith((".yaml", ".yml")):
            raise ValueError("must name a YAML values file (.yaml or .yml)")
        return value

    @field_validator("requires", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @field_validator("endpoint")
    @classmethod
    def _endpoint(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("http://", "https://")):
            raise ValueError("must be an http:// or https:// URL")
        return value

    @model_validator(mode="after")
    def _cluster_needs(self) -> Environment:
        if self.executor == "kubernetes":
            missing = [k for k in ("argocd", "rollout", "endpoint", "image") if getattr(self, k) is None]
            if self.cache.pvc is None:
                missing.append("cache.pvc")
            if missing:
                raise ValueError(f"executor 'kubernetes' needs {', '.join(missing)}")
        return self


class LocalArtifactStore(Strict):
    """Artifacts published into a directory every environment can read (the local environment, the sandbox)."""

    store: Literal["local"]
    path: str = Field(description="store directory; relative paths are relative to this file")

    @field_validator("path")
    @classmethod
    def _path(cls, value: str, info: ValidationInfo) -> str:
        return str((_base_dir(info) / Path(value).expanduser()).resolve())


class HubArtifactStore(Strict):
    """Artifacts published into a private Hub repo of the organization, each pinned to its upload commit."""

    store: Literal["hub"]
    repo: str = Field(pattern=r"^[\w.-]+/[\w.-]+$", description="org/name of the (private) model repo")
    token_env: str = Field("HF_TOKEN", description="environment variable holding a token with write access")


ArtifactStoreSettings = Annotated[LocalArtifactStore | HubArtifactStore, Field(discriminator="store")]


class PromotionConfig(Strict):
    """The whole of promotion.yaml."""

    version: Literal[1] = 1
    gitops: GitOpsRepo
    model: ModelSettings = ModelSettings()
    artifacts: ArtifactStoreSettings | None = Field(
        None, description="the store every environment preloads the evaluated bytes from"
    )
    environments: dict[Annotated[str, Field(pattern=ENV_NAME)], Environment] = Field(min_length=1)

    def promotion_order(self) -> list[str]:
        """Environments in an order where each comes after the ones it requires.

        Raises:
            ConfigError: the `requires` links form a cycle.
        """
        order: list[str] = []
        state: dict[str, str] = {}

        def visit(name: str, trail: list[str]) -> None:
            if state.get(name) == "done":
                return
            if state.get(name) == "open":
                raise ConfigError("promotion.yaml", [f"requires cycle: {' -> '.join([*trail, name])}"])
            state[name] = "open"
            for needed in self.environments[name].requires:
                visit(needed, [*trail, name])
            state[name] = "done"
            order.append(name)

        for name in self.environments:
            visit(name, [])
        return order

    def environment(self, name: str) -> Environment:
        """The named environment.

        Raises:
            ConfigError: there is no such environment.
        """
        if name not in self.environments:
            known = ", ".join(sorted(self.environments))
            raise ConfigError("promotion.yaml", [f"environments.{name}: no such environment (known: {known})"])
        return self.environments[name]


def _line_of(doc: Any, loc: tuple[int | str, ...]) -> int | None:
    """The 1-based line of the deepest key of ``loc`` that exists in the round-trip YAML document."""
    line: int | None = None
    node = doc
    for part in loc:
        lc = getattr(node, "lc", None)
        try:
            if isinstance(part, int) and isinstance(node, list):
                if lc is not None:
                    line = lc.item(part)[0] + 1
                node = node[part]
            elif isinstance(node, dict) and part in node:
                if lc is not None:
                    line = lc.key(part)[0] + 1
                node = node[part]
            else:
                break
        except (KeyError, IndexError, TypeError):
            break
    return line


def _requires_problems(cfg: PromotionConfig) -> list[tuple[tuple[int | str, ...], str]]:
    """Cross-environment checks: every `requires` names another, known environment, with no cycle."""
    found: list[tuple[tuple[int | str, ...], str]] = []
    names = sorted(cfg.environments)
    for name, env in cfg.environments.items():
        for i, needed in enumerate(env.requires):
            loc = ("environments", name, "requires", i)
            if needed == name:
                found.append((loc, "an environment cannot require itself"))
            elif needed not in cfg.environments:
                found.append((loc, f"unknown environment {needed!r}; expected one of: {', '.join(names)}"))
    if not found:
        try:
            cfg.promotion_order()
        except ConfigError as exc:
            found.append((("environments",), exc.problems[0]))
    return found


def describe_error(error: dict[str, Any]) -> str:
    """Pydantic's message, plus what was given where showing it is useful and safe."""
    message = str(error["msg"]).removeprefix("Value error, ")
    given = error.get("input")
    if error["type"] == "missing":
        return "is required but missing"
    if error["type"] == "extra_forbidden":
        return "is not a known key (check the spelling; see examples/ for every key)"
    if isinstance(given, bool | int | float | str):
        shown = given if not isinstance(given, str) or len(given) <= 60 else given[:57] + "..."
        message += f" (got {shown!r})"
    return redact(message)


def problem_line(path: str, doc: Any, loc: tuple[int | str, ...], message: str) -> str:
    """One finding as `file:line: key.path: message` (the line when the key is in the document)."""
    key = ".".join(str(p) for p in loc) or "(top level)"
    line = _line_of(doc, loc)
    return f"{path}:{line}: {key}: {message}" if line else f"{path}: {key}: {message}"


def read_yaml(text: str, path: str) -> Any:
    """A round-trip YAML document (it keeps line numbers for messages).

    Raises:
        ConfigError: the text is not YAML (the message names the file and line).
    """
    try:
        return YAML(typ="rt").load(text)
    except MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f"{path}:{mark.line + 1}" if mark is not None else path
        raise ConfigError(path, [f"{where}: not valid YAML: {exc.problem}"]) from None


def parse_config(text: str, path: str = "promotion.yaml", base_dir: Path | None = None) -> PromotionConfig:
    """Validate configuration text. ``path`` is only used in messages; ``base_dir`` anchors relative paths.

    Raises:
        ConfigError: the text is not YAML, or does not describe a valid configuration.
    """
    doc = read_yaml(text, path)
    if doc is None:
        raise ConfigError(path, [f"{path}: the file is empty; expected a mapping with 'gitops' and 'environments'"])
    if not isinstance(doc, dict):
        raise ConfigError(path, [f"{path}: expected a mapping at the top level, got {type(doc).__name__}"])
    hint = "see examples/*/promotion.yaml for every key and its expected form"
    try:
        cfg = PromotionConfig.model_validate(doc, context={"base_dir": base_dir or Path(".")})
    except ValidationError as exc:
        problems = [problem_line(path, doc, tuple(e["loc"]), describe_error(dict(e))) for e in exc.errors()]
        raise ConfigError(path, problems, hint=hint) from None
    cross = _requires_problems(cfg)
    if cross:
        raise ConfigError(path, [problem_line(path, doc, loc, message) for loc, message in cross], hint=hint)
    return cfg


def load_config(path: str | Path) -> PromotionConfig:
    """Read and validate a promotion.yaml. Relative paths in it are relative to the file.

    Raises:
        ConfigError: the file cannot be read, is not YAML, or is not a valid configuration.
    """
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
        raise ConfigError(
            str(file), [f"{file}: cannot read the file: {reason}"], hint="pass the path of a readable promotion.yaml"
        ) from None
    return parse_config(text, str(file), file.parent.resolve())


def cache_home() -> Path:
    """The pipeline's own cache (GitOps clones, eval results, the small model): ``$MODELCTL_CACHE``, else
    ``~/.cache/modelctl``. Read at call time, so a Job or a test can point it elsewhere."""
    import os

    return Path(os.environ.get("MODELCTL_CACHE") or Path.home() / ".cache" / "modelctl")
