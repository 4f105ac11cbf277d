#!/usr/bin/env bash
# `make demo`: a whole promotion on this machine, with no cluster and no Hub.
# Everything it writes goes to demo-output/ (ignored by git); Prefect runs its embedded server.
set -euo pipefail
cd "$(dirname "$0")/.."
out=demo-output
config=examples/local/promotion.yaml
mkdir -p "$out"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TQDM_DISABLE=1
export PREFECT_HOME="$PWD/$out/prefect" DO_NOT_TRACK=1 PREFECT_SERVER_ANALYTICS_ENABLED=false
# `modelctl promote` prints one line per step and a summary; what the libraries print (Prefect, lm-eval,
# llmcompressor, torch) goes to the run's log file, whose path it prints first and whose end it shows on failure.

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
started=$(date +%s)

step "1. Build the small trained model (a Llama with a locally trained tokenizer; cached after the first build)"
modelctl tinymodel build "$out/tiny"

step "2. Validate the configuration, and create the GitOps repo from the template (a skip if it exists)"
modelctl config check "$config" --json | python3 -c 'import json,sys; d=json.load(sys.stdin); print("valid:", d["ok"])'
modelctl gitops init "$out/gitops-remote.git"

step "3. Promote it to the local environment: resolve, quantize (AWQ), preload, eval, load and capacity gates, commit"
modelctl promote "$out/tiny" --env local -c "$config"
# The capacity plan its record carries (gates.capacity in the config): goodput per replica, replicas at peak, cost.
python3 - "$out/gitops-remote.git" <<'PY'
import subprocess, sys
from rich.console import Console
from pipeline.record import PromotionRecord
git = ["git", "--git-dir", sys.argv[1]]
names = subprocess.run([*git, "ls-tree", "--name-only", "main", "records/local/"], capture_output=True, text=True)
newest = sorted(names.stdout.split())[-1]
shown = subprocess.run([*git, "show", f"main:{newest}"], capture_output=True, text=True, check=True)
record = PromotionRecord.from_json(shown.stdout)
if record.capacity_plan is not None and record.capacity_gate is not None:
    print(record.capacity_gate.summary())
    Console().print(record.capacity_plan.table())
PY

step "4. Promote a deliberately damaged copy: the eval gate refuses it, and nothing is committed"
modelctl tinymodel damage "$out/tiny" "$out/tiny-damaged"
# Refused it must be, and by the eval gate: any other failure (a held slot, a crash) fails the demo.
set +e
modelctl promote "$out/tiny-damaged" --env local -c "$config" --json > "$out/damaged.json"
code=$?
set -e
python3 - "$out/damaged.json" "$code" <<'PY'
import json, sys
text, code = open(sys.argv[1]).read(), int(sys.argv[2])
if code == 0:
    sys.exit("the damaged candidate was promoted: the quality gate did not work")
try:
    result = json.loads(text)
except ValueError:
    sys.exit(f"the damaged candidate failed (exit {code}) without saying why: {text[-300:]!r}")
reason = json.dumps(result)
if code != 2 or "rejected" not in reason or "eval" not in reason:
    sys.exit(f"the damaged candidate failed for another reason than the eval gate (exit {code}): {reason[:400]}")
print(f"refused, as it should be, by the eval gate (exit {code}): {result.get('message')}"[:400])
PY

step "4b. Promote the same model again: it already runs there, so this is a skip under the original id"
modelctl promote "$out/tiny" --env local -c "$config"

step "5. What Git says now"
modelctl history --env local -c "$config"
modelctl status -c "$config"

step "6. The sandbox: a SIMULATED cluster (API server, Argo CD, Argo Rollouts) around real pods, Services and Prometheus"
sb="$out/sandbox"
modelctl sandbox down --dir "$sb" >/dev/null 2>&1 || true  # one left over from an interrupted demo
rm -rf "$sb" "$out/v1" "$out/v3"                            # every run starts from an empty cluster and GitOps repo
modelctl sandbox up --dir "$sb" --traffic 3                 # 3 user requests/s through the users' Service
trap 'modelctl sandbox down --dir "$sb" >/dev/null 2>&1 || true' EXIT
export KUBECONFIG="$sb/kubeconfig"                          # the pipeline's ServiceAccount, as on a real cluster
sbc="$sb/promotion.yaml"
sandbox_started=$(date +%s)

step "7. v1 to staging: every step a Job (pods as processes), Argo CD syncs the real chart, the first version comes up"
modelctl tinymodel damage "$out/tiny" "$out/v1" --strength 1.5 >/dev/null   # a weaker first version
modelctl promote "$out/v1" --env staging -c "$sbc"

step "8. v2, a better candidate: its canary takes half the users' traffic, judged against stable on Prometheus, promoted"
modelctl promote "$out/tiny" --env staging -c "$sbc"

step "9. v3: as good as v2 on the eval gate, but deeper: its canary breaches the TTFT tolerance, aborted and reverted"
modelctl tinymodel deepen "$out/tiny" "$out/v3" --layers 12 --intermediate 1024 >/dev/null
set +e
modelctl promote "$out/v3" --env staging -c "$sbc" --json > "$out/v3.json"
code=$?
set -e
python3 - "$out/v3.json" "$code" <<'PY'
import json, sys
text, code = open(sys.argv[1]).read(), int(sys.argv[2])
result = json.loads(text) if text.strip().startswith("{") else {}
record = result.get("record") or {}
rollout = record.get("rollout") or {}
if code == 0 or record.get("decision") != "reverted":
    sys.exit(f"v3 was not reverted by its canary (exit {code}): {text[-400:]}")
if "vs stable" not in (rollout.get("reason") or ""):
    sys.exit(f"v3 was reverted for another reason than its TTFT against stable: {rollout.get('reason')}")
print(f"reverted, as it should be (exit {code}): {rollout['reason']}"[:400])
PY
modelctl timeline --env staging -c "$sbc"                     # read back from Git: the revert's record keeps it

step "10. Git and the cluster agree: v2 runs, Healthy, as Git says"
modelctl sandbox check --dir "$sb"
modelctl history --env staging -c "$sbc"
modelctl sandbox down --dir "$sb"
trap - EXIT

cat <<MSG

What ran ($(( $(date +%s) - started )) s; the sandbox part $(( $(date +%s) - sandbox_started )) s): a real promotion through the
Prefect flow. The small model was quantized (AWQ, 4-bit), preloaded and verified in the cache, passed lm-eval's smoke
suite, a load test and a capacity sweep (goodput per replica, replicas and cost at peak) against a real local server,
and was committed to the GitOps repo with its record. A damaged copy was refused by the eval gate.

Then the same pipeline on the sandbox, a SIMULATED cluster: its API server and the Argo CD and Argo Rollouts
controllers are simulated; the chart (rendered by Helm), the pods (vLLM and the pipeline's Jobs, as processes),
the Services, the users' traffic and Prometheus are real. v1 came up as the first version; v2's canary was judged on
vLLM's TTFT from Prometheus against stable and promoted; v3's canary was slower than the tolerance, aborted, its
commit reverted, and the Rollout went back to v2. On a real cluster, point examples/cluster/promotion.yaml at yours:
  modelctl promote org/name@<revision> --env staging -c examples/cluster/promotion.yaml
MSG
