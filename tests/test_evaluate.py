"""The eval step with real lm-eval on the small model: suites, the smoke gate both ways, the cache, clear errors."""

from __future__ import annotations

import json
import os
import re
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import pytest
from typer.testing import CliRunner

from pipeline import tinymodel
from pipeline.cli import app
from pipeline.errors import ConfigError, TerminalError, TransientError
from pipeline.evaluate import (
    Endpoint,
    EvalReport,
    LocalWeights,
    Suite,
    baseline_from_record,
    eval_gate,
    evaluate,
    load_baseline,
    load_suite,
)
from pipeline.evaluate.run import cache_key, subject_of
from pipeline.evaluate.suite import parse_suite
from pipeline.evaluate.tasks import FACTS_DATA, TASKS_DIR, facts_jsonl
from pipeline.record import PromotionRecord, new_promotion_id
from pipeline.serve import free_port

if TYPE_CHECKING:
    from pipeline.quantize import Artifact

runner = CliRunner()


@pytest.fixture(scope="module")
def smoke() -> Suite:
    return load_suite("smoke")


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("modelctl-cache")


@pytest.fixture(scope="module")
def tiny_report(tiny_model: Path, smoke: Suite, cache_root: Path) -> EvalReport:
    """The small model on the smoke suite, evaluated once for this module (then the cache answers)."""
    return evaluate(LocalWeights(tiny_model), smoke, cache_dir=cache_root)


def test_committed_task_data_is_what_the_generator_writes() -> None:
    assert FACTS_DATA.read_text(encoding="utf-8") == facts_jsonl()
    items = [json.loads(line) for line in facts_jsonl().splitlines()]
    assert len(items) == len(tinymodel.facts()) == 120
    assert items[0]["prompt"].startswith("Q: ") and items[0]["choices"][items[0]["gold"]] == items[0]["answer"]


def test_the_shipped_suites_load_with_their_policies(smoke: Suite) -> None:
    assert smoke.include_path == str(TASKS_DIR)
    assert smoke.metric_keys() == [("facts_mc", "acc,none"), ("facts_gen", "exact_match,strip")]
    assert smoke.tasks["facts_mc"].metrics["acc,none"].floor == 0.8
    standard = load_suite("standard")
    assert set(standard.tasks) == {"mmlu", "gsm8k", "arc_challenge", "hellaswag"}
    assert standard.tasks["mmlu"].metrics["acc,none"].max_regression_abs == 0.03  # baseline minus 3 points
    assert standard.include_path is None


def test_a_broken_suite_names_the_file_the_line_and_the_key(tmp_path: Path) -> None:
    file = tmp_path / "broken.yaml"
    file.write_text(
        "tasks:\n  facts_mc:\n    limit: -1\n    metrics:\n      'acc,none': {flor: 0.9, stderr_k: lots}\n"
        "      accuracy: {floor: 0.9}\n"
    )
    with pytest.raises(ConfigError) as caught:
        load_suite(file)
    problems = "\n".join(caught.value.problems)
    assert f"{file}:3: tasks.facts_mc.limit: Input should be greater than 0" in problems
    assert f"{file}:5: tasks.facts_mc.metrics.acc,none.flor: is not a known key" in problems
    assert "tasks.facts_mc.metrics.acc,none.stderr_k" in problems and "'lots'" in problems
    assert "must be 'metric,filter'" in problems
    file.write_text("tasks:\n  facts_mc: [unclosed\n")
    with pytest.raises(ConfigError, match=r"broken\.yaml:3: not valid YAML"):
        load_suite(file)


def test_an_unknown_suite_name_lists_the_known_ones() -> None:
    with pytest.raises(ConfigError) as caught:
        load_suite("smok")
    assert "smok.yaml: cannot read the suite" in str(caught.value) and "known: smoke, standard" in str(caught.value)


def test_the_small_model_passes_the_smoke_gate_against_its_own_baseline(tiny_report: EvalReport, smoke: Suite) -> None:
    assert tiny_report.metric("facts_mc", "acc,none").value >= 0.95  # type: ignore[union-attr]
    generation = tiny_report.metric("facts_gen", "exact_match,strip")
    # a score (and so its stderr: 0 at a perfect score) varies between builds: assert the verdict, not the numbers
    assert generation is not None and generation.value >= 0.95 and generation.n == 120
    assert generation.stderr is not None
    assert tiny_report.lm_eval_version == "0.4.13" and tiny_report.subject.startswith("weights sha256:")
    against_itself = eval_gate(tiny_report, tiny_report, smoke)
    assert against_itself.passed, against_itself.summary()
    by_floors = eval_gate(tiny_report, None, smoke)
    assert by_floors.passed and "judged by the floor alone" in by_floors.rows[0].why


def test_the_same_evaluation_again_is_a_cache_hit(
    tiny_model: Path, tiny_report: EvalReport, smoke: Suite, cache_root: Path
) -> None:
    again = evaluate(LocalWeights(tiny_model), smoke, cache_dir=cache_root)
    assert again.skipped and not tiny_report.skipped
    assert again.tasks == tiny_report.tasks and again.created_at == tiny_report.created_at
    # the key changes with the suite's content and with the model
    edited = parse_suite(Path(smoke.path).read_text() + "\n# edited\n", Path(smoke.path))
    subject = subject_of(LocalWeights(tiny_model))
    assert cache_key(subject, edited, "hf") != cache_key(subject, smoke, "hf")
    assert cache_key("artifact abc", smoke, "hf") != cache_key(subject, smoke, "hf")


@pytest.mark.slow
def test_a_damaged_copy_fails_the_smoke_gate_naming_the_metrics(
    tiny_model: Path, tiny_report: EvalReport, smoke: Suite, cache_root: Path, tmp_path: Path
) -> None:
    damaged = tinymodel.damage(tiny_model, tmp_path / "damaged")
    report = evaluate(LocalWeights(damaged), smoke, cache_dir=cache_root)
    result = eval_gate(report, tiny_report, smoke)
    assert result.verdict == "fail"
    assert {row.name for row in result.failures} == {"facts_mc acc,none", "facts_gen exact_match,strip"}
    # The damaged model's scores are noisy (0 on one build, 0.033 on another): assert the verdict and the reason.
    assert re.search(r"facts_gen exact_match,strip: [0-9.]+ is below the floor 0\.8", result.summary())
    assert all(re.search(r"baseline [0-9.]+", row.why) for row in result.failures), result.summary()


def test_a_missing_baseline_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(TerminalError) as caught:
        load_baseline(tmp_path / "incumbent.json")
    assert "incumbent.json does not exist" in caught.value.what and "--baseline" in (caught.value.hint or "")
    record = tmp_path / "record.json"
    record.write_text(PromotionRecord(id=new_promotion_id(), env="prod").to_json())
    with pytest.raises(TerminalError, match="a promotion record without an eval report"):
        load_baseline(record)


def test_a_promotion_record_serves_as_the_baseline(tiny_report: EvalReport, tmp_path: Path) -> None:
    record = PromotionRecord(id=new_promotion_id(), env="prod", eval_report=tiny_report.model_dump(mode="json"))
    (tmp_path / "record.json").write_text(record.to_json())
    assert load_baseline(tmp_path / "record.json").tasks == tiny_report.tasks
    stored = PromotionRecord.from_json(record.to_json())  # as GitOpsRepo.baseline(env) returns it
    assert baseline_from_record(stored) == tiny_report.model_copy(update={"skipped": False})
    assert baseline_from_record(PromotionRecord(id=new_promotion_id(), env="prod")) is None
    assert baseline_from_record(None) is None


@pytest.mark.slow
def test_an_unknown_task_is_a_clear_error_and_nothing_is_written(tiny_model: Path, tmp_path: Path) -> None:
    suite = parse_suite("tasks:\n  hellaswg:\n    metrics:\n      'acc,none': {floor: 0.5}\n", tmp_path / "typo.yaml")
    with pytest.raises(TerminalError) as caught:
        evaluate(LocalWeights(tiny_model), suite, cache_dir=tmp_path / "cache")
    assert "typo.yaml: tasks.hellaswg: unknown lm-eval task 'hellaswg'" in caught.value.what
    assert "did you mean hellaswag" in (caught.value.hint or "")
    assert not (tmp_path / "cache").exists()


def test_a_broken_local_task_names_the_task_and_the_cause(tmp_path: Path) -> None:
    from pipeline.evaluate.run import load_tasks

    mc = (TASKS_DIR / "facts" / "facts_mc.yaml").read_text()
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "lost.yaml").write_text(mc.replace("facts_mc", "lost").replace("facts.jsonl", "no.jsonl"))
    (tmp_path / "tasks" / "odd.yaml").write_text(mc.replace("facts_mc", "odd").replace("num_fewshot", "fewshots"))
    cases = {
        "lost": ("its dataset could not be loaded", "no.jsonl"),
        "odd": ("lm-eval could not build the task", "unexpected keyword argument 'fewshots'"),
    }
    for task, (what, cause) in cases.items():
        text = f"include_path: tasks\ntasks:\n  {task}:\n    metrics:\n      'acc,none': {{floor: 0.5}}\n"
        with pytest.raises(TerminalError) as caught:
            load_tasks(parse_suite(text, tmp_path / "s.yaml"))
        assert f"s.yaml: tasks.{task}: {what}" in caught.value.what and cause in caught.value.what


@pytest.mark.slow
def test_a_hub_dataset_missing_offline_is_a_clear_error(tiny_model: Path, tmp_path: Path) -> None:
    suite = parse_suite("tasks:\n  arc_easy:\n    metrics:\n      'acc,none': {floor: 0.5}\n", tmp_path / "s.yaml")
    with pytest.raises(TerminalError) as caught:
        evaluate(LocalWeights(tiny_model), suite, cache_dir=tmp_path / "cache")
    assert "s.yaml: tasks.arc_easy: its dataset could not be loaded offline" in caught.value.what
    assert "allenai/ai2_arc" in caught.value.what and "--online" in (caught.value.hint or "")
    assert not (tmp_path / "cache").exists()


class _FakeServer(BaseHTTPRequestHandler):
    """An OpenAI-compatible server that answers every chat question "blue" and /v1/completions without logprobs
    (like `transformers serve`); it records the Authorization headers it receives."""

    seen_auth: ClassVar[list[str]] = []

    def do_POST(self) -> None:
        self.seen_auth.append(self.headers.get("Authorization", ""))
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if self.path.endswith("/chat/completions"):
            choice: dict[str, object] = {"index": 0, "message": {"role": "assistant", "content": "blue"}}
        else:
            choice = {"index": 0, "text": " blue"}
        body = json.dumps({"choices": [{**choice, "finish_reason": "stop"}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def fake_server() -> Iterator[str]:
    _FakeServer.seen_auth = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FakeServer)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_an_endpoint_without_echo_logprobs_is_refused_before_evaluating(
    fake_server: str, smoke: Suite, tmp_path: Path
) -> None:
    with pytest.raises(TerminalError) as caught:
        evaluate(Endpoint(fake_server + "/v1", "tiny"), smoke, cache_dir=tmp_path)
    assert "does not return prompt logprobs" in caught.value.what and "multiple-choice" in caught.value.what
    assert "vLLM" in (caught.value.hint or "")
    assert not (tmp_path / "evaluations").exists()


def test_the_endpoint_token_is_sent_but_never_logged_or_recorded(
    fake_server: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    token = "sk-local-secret-123456"
    monkeypatch.setenv("EVAL_API_KEY", token)
    suite = parse_suite(
        f"include_path: {TASKS_DIR}\ntasks:\n  facts_gen:\n    limit: 8\n    metrics:\n"
        "      'exact_match,strip': {floor: 0.1}\n",
        tmp_path / "gen.yaml",
    )
    with caplog.at_level("DEBUG"):
        report = evaluate(Endpoint(fake_server, "tiny", api_key_env="EVAL_API_KEY"), suite, cache_dir=tmp_path)
    assert _FakeServer.seen_auth and all(auth == f"Bearer {token}" for auth in _FakeServer.seen_auth)
    assert report.metric("facts_gen", "exact_match,strip") is not None
    stored = "".join(p.read_text() for p in (tmp_path / "evaluations").glob("*.json"))
    assert "Initializing local-chat-completions model" in caplog.text  # lm-eval logs its model_args
    assert stored and token not in stored and token not in caplog.text
    assert "OPENAI_API_KEY" not in os.environ  # lent to lm-eval for the call only


def test_credentials_in_an_endpoint_url_are_refused_without_showing_them(smoke: Suite, tmp_path: Path) -> None:
    endpoint = Endpoint(f"http://bob:hf_abcdefgh12345678@127.0.0.1:{free_port()}", "tiny")
    with pytest.raises(TerminalError) as caught:
        evaluate(endpoint, smoke, cache_dir=tmp_path)
    assert "carries credentials" in caught.value.what and "--api-key-env" in (caught.value.hint or "")
    assert "hf_abcdefgh12345678" not in str(caught.value) and "***" in str(caught.value)


def test_an_unreachable_endpoint_is_a_transient_error(smoke: Suite, tmp_path: Path) -> None:
    with pytest.raises(TransientError, match="cannot be reached"):
        evaluate(Endpoint(f"http://127.0.0.1:{free_port()}", "tiny"), smoke, cache_dir=tmp_path)


def test_cli_prints_the_table_and_gate_and_writes_a_reusable_report(
    tiny_model: Path, tiny_report: EvalReport, cache_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MODELCTL_CACHE", str(cache_root))  # the module's evaluation is in this cache
    monkeypatch.setenv("COLUMNS", "200")
    result = runner.invoke(app, ["evaluate", str(tiny_model), "--suite", "smoke", "--output", str(tmp_path / "r.json")])
    assert result.exit_code == 0, result.output
    score = tiny_report.metric("facts_mc", "acc,none").value  # type: ignore[union-attr]
    assert "facts_mc" in result.output and "exact_match,strip" in result.output and f"{score:.4f}" in result.output
    assert "eval gate: PASS" in result.output and "from the cache" in result.output
    args = ["evaluate", str(tiny_model), "--baseline", str(tmp_path / "r.json"), "--json"]
    data = json.loads(runner.invoke(app, args).stdout)
    assert data["ok"] is True and data["cached"] is True and data["gate"]["verdict"] == "pass"
    assert data["report"]["tasks"]["facts_mc"]["acc,none"]["n"] == 120
    assert all(row["baseline"] is not None for row in data["gate"]["rows"])


def test_cli_input_errors_exit_2_with_a_message(tiny_model: Path, tmp_path: Path) -> None:
    missing = runner.invoke(app, ["evaluate", str(tiny_model), "--baseline", str(tmp_path / "nope.json"), "--json"])
    assert missing.exit_code == 2
    assert "nope.json does not exist" in json.loads(missing.stdout)["message"]
    both = runner.invoke(app, ["evaluate", str(tiny_model), "--endpoint", "http://127.0.0.1:1", "--model", "m"])
    assert both.exit_code == 2 and "exactly one of ARTIFACT" in both.output
    not_model = runner.invoke(app, ["evaluate", str(tmp_path), "--suite", "smoke"])
    assert not_model.exit_code == 2 and "is not a model directory" in not_model.output


@pytest.mark.slow
def test_a_quantized_artifact_passes_the_gate_against_the_full_precision_model(
    quantized: Callable[[str, str], Artifact], tiny_report: EvalReport, smoke: Suite, cache_root: Path
) -> None:
    artifact = quantized("llmcompressor", "gptq")
    report = evaluate(LocalWeights(Path(artifact.path)), smoke, cache_dir=cache_root)
    # the cache key carries the artifact id and its bytes' manifest digest
    assert re.fullmatch(rf"artifact {artifact.id} manifest sha256:[0-9a-f]{{64}}", report.subject)
    result = eval_gate(report, tiny_report, smoke)
    assert result.passed, result.summary()


def test_offline_switches_hold_only_for_the_evaluation(monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    from pipeline.evaluate.run import OFFLINE_SWITCHES, offline_switches

    for name in OFFLINE_SWITCHES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    with offline_switches(True):
        assert all(os.environ[name] == "1" for name in OFFLINE_SWITCHES)
        assert huggingface_hub.constants.HF_HUB_OFFLINE is True  # already-imported libraries see it too
    assert not any(name in os.environ for name in OFFLINE_SWITCHES)
    assert huggingface_hub.constants.HF_HUB_OFFLINE is False
    with offline_switches(False):
        assert "HF_HUB_OFFLINE" not in os.environ  # --online leaves the network to the libraries


@pytest.mark.slow
def test_the_standard_suite_names_real_lm_eval_tasks_and_metrics() -> None:
    from lm_eval.tasks._yaml_loader import load_yaml

    from pipeline.evaluate.run import task_manager

    standard = load_suite("standard")
    index = task_manager(standard).task_index  # raises on an unknown task
    for task in ("gsm8k", "arc_challenge", "hellaswag"):
        config = load_yaml(index[task].yaml_path, resolve_func=False)
        metrics = {m["metric"] for m in config["metric_list"]}
        filters = {f["name"] for f in config.get("filter_list", [])} or {"none"}
        for key in standard.tasks[task].metrics:
            metric, _, filt = key.partition(",")
            assert metric in metrics and filt in filters, (task, key, metrics, filters)


def test_the_eval_cache_is_keyed_by_the_bytes_not_only_the_artifact_id(smoke: Suite, tmp_path: Path) -> None:
    """A rebuild under the same artifact id with other bytes must never reuse the first build's score."""

    def artifact(name: str, sha: str) -> Path:
        folder = tmp_path / name
        folder.mkdir()
        (folder / "config.json").write_text("{}")
        files = [{"name": "model.safetensors", "size": 10, "sha256": sha}]
        (folder / "artifact.json").write_text(json.dumps({"id": "same-id", "files": files}))
        return folder

    first, rebuilt = (
        subject_of(LocalWeights(artifact("a", "1" * 64))),
        subject_of(LocalWeights(artifact("b", "2" * 64))),
    )
    assert first.startswith("artifact same-id ") and rebuilt.startswith("artifact same-id ")
    assert cache_key(first, smoke, "hf") != cache_key(rebuilt, smoke, "hf")
    assert subject_of(LocalWeights(artifact("c", "1" * 64))) == first, "the same bytes hit the same entry"
