"""`python -m pipeline ...` is `modelctl ...` (the entrypoint Kubernetes Jobs run)."""

from pipeline.cli import main

main()
