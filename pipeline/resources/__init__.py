"""The data the library ships: the GitOps repo template (``gitops/``) and the eval suites (``evaluations/``).

A wheel carries both folders as package data of this package (pyproject.toml maps the top-level folders to
``pipeline.resources.gitops`` and ``pipeline.resources.evaluations``), found here through importlib.resources. A
checkout (or an editable install) has no copy under this package: the top-level folders are the source of truth.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path
from typing import Literal

Resource = Literal["gitops", "evaluations"]

CHECKOUT = Path(__file__).resolve().parents[2]


def resource_dir(name: Resource) -> Path:
    """The shipped folder ``name``: the installed package data, else the checkout's top-level folder."""
    packaged = files(__name__) / name
    if packaged.is_dir():
        return Path(str(packaged))
    return CHECKOUT / name
