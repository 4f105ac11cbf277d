"""`modelctl gitops verify`: what a pull request to the GitOps repo may merge, checked before Argo CD sees it.

For each environment whose values file changed between a base and the checkout's working tree: the values pass
the chart's values.schema.json, the chart renders with them (Helm's own renderer, as Argo CD renders it), the
model revision is a pinned 40-hex sha, the artifact is in the artifact store with a manifest, and the eval report
kept for its bytes (by manifest digest) passes the environment's eval gate, or the check says which gate has not
run. The checks are pure functions of what they are given; :func:`verify_checkout` gathers the inputs.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from git import GitCommandError, InvalidGitRepositoryError, NoSuchPathError, Repo
from pydantic import ValidationError
from ruamel.yaml import YAML
from ruamel.yaml.error import YAMLError

from pipeline.config import Environment, PromotionConfig
from pipeline.errors import PipelineError, TerminalError
from pipeline.evaluate.gate import eval_gate
from pipeline.evaluate.report import EvalReport, baseline_from_record
from pipeline.evaluate.suite import load_suite
from pipeline.gitops.commits import CHART, LOG_FORMAT, RECORDS, live_promotions, parse_log
from pipeline.gitops.values import check_values, get_key
from pipeline.quantize.recipe import MANIFEST
from pipeline.record import PromotionRecord
from pipeline.store.base import ArtifactStore, StoredArtifact, parse_manifest

SHA = re.compile(r"^[0-9a-f]{40}$")


@dataclass(frozen=True)
class Check:
    """One check of one environment's values: passed or not, and why."""

    name: str
    passed: bool
    reason: str


@dataclass
class EnvironmentVerdict:
    """Every check of one changed environment."""

    env: str
    values_file: str
    checks: list[Check] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    def failures(self) -> list[Check]:
        return [c for c in self.checks if not c.passed]


@dataclass
class Verification:
    """The verdict on a change to the GitOps repo: every environment whose values changed."""

    base: str
    environments: list[EnvironmentVerdict]

    @property
    def passed(self) -> bool:
        return all(e.passed for e in self.environments)

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": self.passed,
            "base": self.base,
            "environments": [{**asdict(e), "passed": e.passed} for e in self.environments],
        }


def check_schema(text: str, chart_dir: Path, where: str) -> tuple[Check, dict[str, Any] | None]:
    """The values against the chart's values.schema.json; returns the merged values when they pass."""
    try:
        merged = check_values(text, chart_dir, where)
    except TerminalError as exc:
        return Check("schema", False, exc.what), None
    except YAMLError as exc:
        return Check("schema", False, f"{where} is not YAML: {str(exc).splitlines()[0]}"), None
    return Check("schema", True, "the values pass values.schema.json"), merged


def check_render(values: dict[str, Any], chart_dir: Path) -> Check:
    """The chart renders with the values (helm-python-sdk, offline: Helm's own renderer, as Argo CD's)."""
    try:
        import helm_python
    except ImportError:
        return Check("render", False, "helm-python-sdk is not installed: cannot render the chart (pip install it)")
    try:
        with helm_python.Chart.load(str(chart_dir)) as chart:
            manifests = chart.render(values=values, name="llm-inference", namespace="modelctl")
    except helm_python.HelmError as exc:
        return Check("render", False, f"the chart does not render: {str(exc).splitlines()[0][:300]}")
    kinds = sum(1 for text in manifests.values() if text.strip())
    return Check("render", True, f"the chart renders ({kinds} manifests)")


def check_pinned(values: dict[str, Any]) -> Check:
    """The model revision is a pinned 40-hex commit sha, never a branch or tag name."""
    revision = str(get_key(values, "model.revision") or "")
    if not SHA.match(revision):
        return Check("pinned", False, f"model.revision {revision or '(empty)'!r} is not a pinned 40-hex commit sha")
    return Check("pinned", True, f"model.revision is pinned ({revision[:12]})")


def check_artifact(values: dict[str, Any], store: ArtifactStore | None) -> tuple[Check, StoredArtifact | None]:
    """The artifact the values name is published in the store, with a manifest that lists the same bytes."""
    artifact_id = str(get_key(values, "model.artifact") or "")
    if not artifact_id:
        return Check("artifact", False, "model.artifact is empty: no artifact to serve"), None
    if store is None:
        return Check("artifact", False, "promotion.yaml has no `artifacts:` store to look the artifact up in"), None
    try:
        stored = store.lookup(artifact_id)
        if stored is None:
            return Check("artifact", False, f"artifact {artifact_id} is not in {store.describe}"), None
        manifest = parse_manifest(b"".join(store.reader(stored)(MANIFEST, 0)), stored.uri)
    except PipelineError as exc:
        return Check("artifact", False, f"artifact {artifact_id}: {exc.what}"), None
    if manifest.id != artifact_id:
        return Check("artifact", False, f"the manifest of {artifact_id} names another artifact ({manifest.id})"), None
    return Check("artifact", True, f"{artifact_id} is in {store.describe} as {stored.manifest_digest}"), stored


def stored_eval(store: ArtifactStore, digest: str) -> EvalReport | None:
    """The eval report kept for the bytes with ``digest``, or None (also for one that is not a valid report)."""
    data = store.get_report(digest, "eval")
    if data is None:
        return None
    try:
        return EvalReport.model_validate(data)
    except ValidationError:
        return None


def check_eval(
    env: Environment, stored: StoredArtifact | None, report: EvalReport | None, baseline: EvalReport | None
) -> Check:
    """The eval report of these bytes passes the environment's eval gate; or which gate has not run."""
    gate = env.gates.eval
    if gate is None:
        return Check("eval", True, "the environment has no eval gate")
    if stored is None:
        return Check("eval", False, f"the eval gate (suite {gate.suite}) cannot be judged: no artifact in the store")
    if report is None:
        return Check(
            "eval", False, f"the eval gate (suite {gate.suite}) has not run on {stored.artifact_id} "
            f"({stored.manifest_digest}): no eval report is kept for these bytes",
        )  # fmt: skip
    result = eval_gate(report, baseline, load_suite(gate.suite), gate.policy)
    return Check("eval", result.passed, result.summary())


def verify_values(
    env_name: str,
    env: Environment,
    text: str,
    chart_dir: Path,
    store: ArtifactStore | None,
    baseline: EvalReport | None = None,
) -> EnvironmentVerdict:
    """Every check of one environment's values text (the checks that need valid values stop at a schema break)."""
    verdict = EnvironmentVerdict(env_name, env.values_file)
    schema, merged = check_schema(text, chart_dir, env.values_file)
    verdict.checks.append(schema)
    try:
        values = YAML(typ="safe").load(text) or {}
    except YAMLError:
        return verdict
    if merged is not None:
        verdict.checks.append(check_render(merged, chart_dir))
    verdict.checks.append(check_pinned(values))
    found, stored = check_artifact(values, store)
    verdict.checks.append(found)
    report = stored_eval(store, stored.manifest_digest) if store is not None and stored is not None else None
    verdict.checks.append(check_eval(env, stored, report, baseline))
    return verdict


def _open(checkout: Path) -> Repo:
    try:
        return Repo(checkout)
    except (InvalidGitRepositoryError, NoSuchPathError):
        raise TerminalError(
            f"{checkout} is not a git checkout of the GitOps repo", hint="run it inside the checkout, or pass --repo"
        ) from None


def default_base(repo: Repo) -> str:
    """The merge-base with the tracked branch, else HEAD~1.

    Raises:
        TerminalError: neither exists (a repository with one commit and no upstream: pass --base).
    """
    for args in (["merge-base", "HEAD", "@{upstream}"], ["rev-parse", "--verify", "HEAD~1"]):
        try:
            return str(repo.git.execute(["git", *args])).strip()
        except GitCommandError:
            continue
    raise TerminalError("no base to compare with: no tracked branch and no parent commit", hint="pass --base REF")


def baseline_at(repo: Repo, base: str, env_name: str) -> EvalReport | None:
    """The eval report of the promotion live in ``env_name`` at ``base`` (from its record), the gate's baseline."""
    try:
        text = repo.git.execute(["git", "log", f"--format={LOG_FORMAT}", f"--grep=^Environment: {env_name}$", base])
        live = live_promotions(parse_log(str(text)))
        if not live:
            return None
        record = repo.git.execute(["git", "show", f"{base}:{RECORDS}/{env_name}/{live[0].promotion_id}.json"])
    except GitCommandError:
        return None
    return baseline_from_record(PromotionRecord.from_json(str(record)))


def verify_checkout(
    cfg: PromotionConfig, checkout: Path, base: str | None = None, store: ArtifactStore | None = None
) -> Verification:
    """Verify every environment whose values file differs between ``base`` and the checkout's working tree.

    Raises:
        TerminalError: not a git checkout, or ``base`` is not a commit.
    """
    repo = _open(checkout)
    if base is None:
        ref = default_base(repo)
    else:
        try:
            ref = str(repo.git.execute(["git", "rev-parse", "--verify", f"{base}^{{commit}}"])).strip()
        except GitCommandError:
            raise TerminalError(
                f"--base {base!r} is not a commit in {checkout}", hint="pass a branch or a sha"
            ) from None
    changed = set(str(repo.git.execute(["git", "diff", "--name-only", ref, "--"])).splitlines())
    root = Path(repo.working_tree_dir or checkout)
    verdicts = []
    for name in cfg.promotion_order():
        env = cfg.environments[name]
        if env.values_file not in changed:
            continue
        path = root / env.values_file
        if not path.is_file():
            verdicts.append(EnvironmentVerdict(name, env.values_file, [Check("schema", False, "the file was deleted")]))
            continue
        text = path.read_text(encoding="utf-8")
        verdicts.append(verify_values(name, env, text, root / CHART, store, baseline_at(repo, ref, name)))
    return Verification(ref, verdicts)
