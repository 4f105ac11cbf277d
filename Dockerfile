# The pipeline image, ghcr.io/example-org/modelctl: the Prefect flow pods (`prefect flow-run execute`, from the
# Kubernetes work pool) and the step Jobs (`python -m pipeline <step>`) run it. The code is baked in at /app, so
# flows/prefect.yaml's cluster deployments need no git pull step.
#   docker build -t ghcr.io/example-org/modelctl:0.1.0 .
FROM python:3.11-slim

# git: the GitOps repo is driven through the git binary (GitPython). Debian's security updates replace pinned
# versions, so the base image's release pins the package instead.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends git \
    && rm -rf /var/lib/apt/lists/*

ENV PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# The same pins, in the same order, as the Makefile's venv: torch first and alone, then the project with the
# constraints the stack was resolved and tested with.
COPY constraints.txt ./
RUN python -m pip install --no-cache-dir torch==2.13.0

COPY pyproject.toml README.md MANIFEST.in ./
COPY pipeline ./pipeline
COPY flows ./flows
COPY gitops ./gitops
COPY evaluations ./evaluations
COPY examples ./examples
# -P: import the installed package, not /app's copy, to prove the wheel carries the chart and the suites.
RUN python -m pip install --no-cache-dir -c constraints.txt . \
    && python -P -c "from importlib.resources import files as f; r = f('pipeline.resources'); \
assert r.joinpath('gitops/charts/llm-inference').is_dir() and r.joinpath('evaluations/suites').is_dir()"

RUN useradd --create-home --uid 10001 --user-group modelctl
USER 10001:10001
ENV HOME=/home/modelctl

# No ENTRYPOINT: Kubernetes hands the flow pod's command (`prefect flow-run execute`) as the container's args,
# and an entrypoint would be prepended to it. Run the CLI as `docker run IMAGE modelctl ...`.
CMD ["modelctl", "--help"]
