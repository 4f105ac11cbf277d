"""modelctl installs as a package: a wheel carries the chart, the repo template and the eval suites.

The wheel is built from a copy of the sources (so no build output lands in the checkout), installed into a fresh
virtual environment that reuses this environment's dependencies through a .pth file (nothing is downloaded), and
its `modelctl` runs from a temporary directory, far from the checkout.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from pipeline.resources import resource_dir

ROOT = Path(__file__).resolve().parent.parent
SOURCES = (
    "pyproject.toml",
    "README.md",
    "MANIFEST.in",
    "constraints.txt",
    "pipeline",
    "flows",
    "sandbox",
    "gitops",
    "evaluations",
)
IGNORE = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "build")


@dataclass(frozen=True)
class Installed:
    wheel: Path
    python: Path
    modelctl: Path
    workdir: Path


def _files(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and "__pycache__" not in p.parts}


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300, check=False)


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    """Build the wheel, install it (no dependencies, no index) into a fresh venv that sees our site-packages."""
    base = tmp_path_factory.mktemp("package")
    src, dist, venv, work = base / "src", base / "dist", base / "venv", base / "work"
    src.mkdir()
    work.mkdir()
    for name in SOURCES:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=IGNORE)
        else:
            shutil.copy2(path, src / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    built = _run([*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(dist), str(src)], base)
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    (wheel,) = dist.glob("modelctl-*.whl")
    made = _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], base)
    assert made.returncode == 0, made.stderr
    python = venv / "bin" / "python"
    site = _run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], base).stdout.strip()
    Path(site, "modelctl-test-deps.pth").write_text(sysconfig.get_path("purelib") + "\n", encoding="utf-8")
    install = [*pip, "--python", str(python), "install", "--no-deps", "--no-index", "--ignore-installed", str(wheel)]
    done = _run(install, base)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return Installed(wheel, python, venv / "bin" / "modelctl", work)


def test_in_a_checkout_the_shipped_folders_are_the_top_level_ones() -> None:
    assert resource_dir("gitops") == ROOT / "gitops"
    assert resource_dir("evaluations") == ROOT / "evaluations"


@pytest.mark.slow
def test_the_wheel_ships_every_module_and_all_the_data(installed: Installed) -> None:
    names = set(zipfile.ZipFile(installed.wheel).namelist())
    modules = {f"{top}/{f}" for top in ("pipeline", "flows") for f in _files(ROOT / top) if f.endswith(".py")}
    missing = sorted(modules - names)
    assert not missing, f"the wheel lacks {missing}: add their packages to [tool.setuptools] packages in pyproject.toml"
    for folder in ("gitops", "evaluations"):
        data = {f"pipeline/resources/{folder}/{f}" for f in _files(ROOT / folder)}
        assert data <= names, f"the wheel lacks {sorted(data - names)}"
    assert "pipeline/resources/gitops/charts/llm-inference/values.schema.json" in names
    assert "pipeline/resources/evaluations/suites/smoke.yaml" in names


@pytest.mark.slow
def test_installed_modelctl_inits_a_gitops_repo_from_the_packaged_template(installed: Installed) -> None:
    where = _run([str(installed.python), "-c", "import pipeline; print(pipeline.__file__)"], installed.workdir)
    assert Path(where.stdout.strip()).is_relative_to(installed.python.parent.parent), where.stdout + where.stderr
    result = _run([str(installed.modelctl), "gitops", "init", "remote.git", "--json"], installed.workdir)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert json.loads(result.stdout)["skipped"] is False
    tree = _run(["git", "-C", "remote.git", "ls-tree", "-r", "--name-only", "main"], installed.workdir).stdout.split()
    for path in (
        "charts/llm-inference/Chart.yaml",
        "charts/llm-inference/values.schema.json",
        "charts/llm-inference/templates/rollout.yaml",
        "envs/local/values.yaml",
        "rbac/pipeline.yaml",
    ):
        assert path in tree
    assert set(tree) == _files(ROOT / "gitops")


@pytest.mark.slow
def test_installed_modelctl_checks_a_config_against_the_packaged_suites(installed: Installed) -> None:
    config = (ROOT / "examples" / "local" / "promotion.yaml").read_text(encoding="utf-8")
    assert "suite: smoke" in config
    (installed.workdir / "promotion.yaml").write_text(config, encoding="utf-8")
    good = _run([str(installed.modelctl), "config", "check", "promotion.yaml", "--json"], installed.workdir)
    assert good.returncode == 0, good.stdout[-3000:] + good.stderr[-3000:]
    suite = Path(json.loads(good.stdout)["suites"]["local"])
    assert suite.is_relative_to(installed.python.parent.parent / "lib")
    assert suite.parts[-4:] == ("resources", "evaluations", "suites", "smoke.yaml")
    code = "from pipeline.evaluate.suite import load_suite; print(load_suite('smoke').include_path)"
    tasks = _run([str(installed.python), "-c", code], installed.workdir)
    assert (Path(tasks.stdout.strip()) / "facts" / "facts.jsonl").is_file(), tasks.stdout + tasks.stderr

    (installed.workdir / "bad.yaml").write_text(config.replace("suite: smoke", "suite: nosuch"), encoding="utf-8")
    bad = _run([str(installed.modelctl), "config", "check", "bad.yaml"], installed.workdir)
    assert bad.returncode == 2
    assert "nosuch" in bad.stderr
    assert "known: smoke, standard" in bad.stderr
