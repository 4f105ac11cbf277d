"""Evaluating through a real local OpenAI-compatible server (`transformers serve` on the small model)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.errors import TerminalError
from pipeline.evaluate import Endpoint, LocalWeights, evaluate, load_suite
from pipeline.evaluate.suite import parse_suite
from pipeline.evaluate.tasks import TASKS_DIR
from pipeline.serve import local_server

GENERATION_SUITE = f"""
include_path: {TASKS_DIR}
tasks:
  facts_gen:
    limit: 40
    metrics:
      "exact_match,strip": {{floor: 0.5}}
"""


@pytest.mark.slow
def test_a_generate_until_task_through_a_local_server_agrees_with_in_process(tiny_model: Path, tmp_path: Path) -> None:
    suite = parse_suite(GENERATION_SUITE, tmp_path / "gen.yaml")
    # chat completions apply the model's chat template, so the in-process run applies it too
    in_process = evaluate(LocalWeights(tiny_model, chat_template=True), suite, cache_dir=tmp_path / "a")
    with local_server(tiny_model, engine="transformers", log_dir=tmp_path / "logs") as server:
        served = evaluate(Endpoint(server.url, server.model, num_concurrent=2), suite, cache_dir=tmp_path / "b")
        assert served.backend == "local-completions+local-chat-completions"
        assert served.subject == f"endpoint {server.url} model {server.model}"
        # the same server cannot run the multiple-choice task: it returns no prompt logprobs, and says so
        with pytest.raises(TerminalError, match="does not return prompt logprobs"):
            evaluate(Endpoint(server.url, server.model), load_suite("smoke"), cache_dir=tmp_path / "c")
    ours = in_process.metric("facts_gen", "exact_match,strip")
    theirs = served.metric("facts_gen", "exact_match,strip")
    assert ours is not None and theirs is not None
    assert theirs.n == ours.n == 40
    assert theirs.value == pytest.approx(ours.value) and theirs.value > 0.5
