"""`pipeline` imports neither Prefect nor flows/: its own commands and its promotion run with both unimportable.

Each check runs in a fresh interpreter whose meta-path refuses ``prefect`` and ``flows`` (and everything under
them), so a top-level import anywhere in what a command loads fails it, and a lazy one fails when reached.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BLOCK = """
import sys
from importlib.abc import MetaPathFinder

class Refuse(MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("prefect", "flows"):
            raise ImportError(f"{name} is blocked: pipeline must not import it")
        return None

sys.meta_path.insert(0, Refuse())
"""


def blocked(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", BLOCK + code], capture_output=True, text=True, cwd=ROOT, timeout=300)


def test_the_block_works() -> None:
    done = blocked("import flows.cli")
    assert done.returncode != 0 and "is blocked" in done.stderr


@pytest.mark.parametrize(
    "args",
    [
        ["--help"],
        ["config", "check", "--config", "examples/local/promotion.yaml"],
        ["status", "--help"],
        ["step", "run", "--request", '{"step": "publish", "artifact_dir": "/nonexistent"}'],
    ],
)
def test_pipeline_commands_run_without_prefect_or_flows(args: list[str]) -> None:
    done = blocked(f"import sys; sys.argv = ['modelctl', *{args!r}]; from pipeline.cli import main; main()")
    assert "is blocked" not in done.stderr, done.stderr[-1500:]
    assert done.returncode in (0, 2), done.stderr[-1500:]


def test_every_pipeline_module_imports_without_prefect_or_flows() -> None:
    code = """
import importlib, pkgutil, pipeline
skip = {"pipeline.__main__"}
for info in pkgutil.walk_packages(pipeline.__path__, "pipeline."):
    if info.name not in skip:
        importlib.import_module(info.name)
import pipeline.promotion, pipeline.steps, pipeline.jobs
print("imported")
"""
    done = blocked(code)
    assert done.returncode == 0 and "imported" in done.stdout, done.stderr[-1500:]


def test_the_composed_modelctl_has_the_flow_commands() -> None:
    from typer.testing import CliRunner

    from flows.cli import app

    shown = CliRunner().invoke(app, ["--help"]).output
    assert all(name in shown for name in ("promote", "rollback", "approve", "status", "step", "config"))
