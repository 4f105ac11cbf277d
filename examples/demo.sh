#!/usr/bin/env bash
# `make demo`: run what the pipeline can do so far, on this machine, with no cluster and no Hub.
# Everything it writes goes to demo-output/ (ignored by git).
set -euo pipefail
cd "$(dirname "$0")/.."
out=demo-output
config=examples/local/promotion.yaml
mkdir -p "$out"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TQDM_DISABLE=1

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
field() { python3 -c "import json,sys; print(json.load(sys.stdin)$1)"; }

step "1. Build the small trained model (a Llama with a locally trained tokenizer; cached after the first build)"
modelctl tinymodel build "$out/tiny"

step "2. Validate the local environment's configuration"
modelctl config check "$config" --json | field '["order"]'

step "3. Quantize it: AWQ W4A16 with llmcompressor, into an immutable artifact (a skip when it exists)"
modelctl quantize "$out/tiny" --config "$config" --out "$out/artifacts" --json > "$out/artifact.json"
artifact_id=$(field '["id"]' < "$out/artifact.json")
source_ref=$(python3 -c 'import json,sys; s=json.load(sys.stdin)["source"]; print(s["repo"]+"@"+s["sha"])' < "$out/artifact.json")
modelctl quantize "$out/tiny" --config "$config" --out "$out/artifacts"
modelctl tinymodel score "$out/artifacts/$artifact_id"

step "4. Preload it onto the cache volume (here a directory), verifying every file; the second time is a skip"
modelctl preload "$out/artifacts/$artifact_id" --cache-root "$out/cache"
modelctl preload "$out/artifacts/$artifact_id" --cache-root "$out/cache"

step "5. A deliberately damaged copy scores far lower: this is what the quality gate will refuse"
modelctl tinymodel damage "$out/tiny" "$out/tiny-damaged"
modelctl tinymodel score "$out/tiny-damaged"

step "6. Create the GitOps repo from the template, and plan the promotion (the values diff; nothing is committed)"
modelctl gitops init "$out/gitops-remote.git"
modelctl plan "$source_ref" --env local -c "$config" --artifact "$artifact_id" \
  --format awq-w4a16 --quantization compressed-tensors --workdir "$out/gitops-work"
modelctl history --env local -c "$config" --workdir "$out/gitops-work"

cat <<'MSG'

What ran: the small model was built and scored; it was quantized (AWQ, 4-bit) into an artifact that still
answers its questions, preloaded and verified in the cache, and the GitOps commit that would promote it was
planned and validated against the chart's schema. A damaged copy was shown to fail its task.

Not run yet (open issues): the lm-eval quality gate, the load-test latency gate, the commit itself as part of
`modelctl promote`, and the Argo Rollouts canary with revert. The canary stage always needs a cluster: see
examples/cluster/promotion.yaml and the README.
MSG
