"""The local lm-eval tasks' data, generated from the small model's synthetic task (``pipeline.tinymodel``).

The task YAMLs in ``evaluations/tasks/facts/`` are written by hand; the data file they read is generated here
and committed, so the smoke suite needs no Hub. A test proves the committed file equals what this writes.
Regenerate with ``python -m pipeline.evaluate.tasks`` after changing the facts.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from pipeline import tinymodel
from pipeline.resources import resource_dir

EVALUATIONS_DIR = resource_dir("evaluations")  # shipped with the package (pipeline.resources)
TASKS_DIR = EVALUATIONS_DIR / "tasks"
FACTS_DATA = TASKS_DIR / "facts" / "facts.jsonl"


def facts_jsonl() -> str:
    """The fact-recall items as JSON lines: question, prompt, choices (every value of the attribute), gold, answer."""
    lines = [json.dumps(item, sort_keys=True) for item in tinymodel.eval_items()]
    return "\n".join(lines) + "\n"


def write_task_data(dest: Path = FACTS_DATA) -> Path:
    """Write the generated data file (only when its content changed, so the file's time stays meaningful)."""
    text = facts_jsonl()
    if not dest.is_file() or dest.read_text(encoding="utf-8") != text:
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_text(text, encoding="utf-8")
    return dest


if __name__ == "__main__":  # pragma: no cover - a maintenance entry point
    sys.stdout.write(f"wrote {write_task_data()}\n")
