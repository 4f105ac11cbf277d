"""The quality gate: run an lm-eval suite -> EvalReport; judge it against the incumbent's -> GateResult.

``suite`` reads ``evaluations/suites/<name>.yaml``; ``run`` evaluates local weights or an OpenAI-compatible
endpoint with lm-eval's Python API (cached); ``gate`` is the pure decision; ``tasks`` generates the local tasks'
data from the small model's synthetic task.

Example:
    >>> suite = load_suite("smoke")  # doctest: +SKIP
    >>> report = evaluate(LocalWeights(Path("demo-output/tiny")), suite)  # doctest: +SKIP
    >>> eval_gate(report, None, suite).passed  # doctest: +SKIP
    True
"""

from pipeline.evaluate.endpoint import Endpoint
from pipeline.evaluate.gate import eval_gate
from pipeline.evaluate.report import EvalReport, MetricValue, baseline_from_record, load_baseline
from pipeline.evaluate.run import LocalWeights, Target, evaluate
from pipeline.evaluate.suite import MetricPolicy, Suite, TaskSpec, load_suite

__all__ = [
    "Endpoint",
    "EvalReport",
    "LocalWeights",
    "MetricPolicy",
    "MetricValue",
    "Suite",
    "Target",
    "TaskSpec",
    "baseline_from_record",
    "eval_gate",
    "evaluate",
    "load_baseline",
    "load_suite",
]
