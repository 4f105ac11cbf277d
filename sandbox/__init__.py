"""A simulated Kubernetes cluster with Argo CD and Argo Rollouts, for the demo, the tests and the benchmarks.

SIMULATED: the control plane (the API server and the Argo controllers) is simulated here; see sandbox/README.md.
"""
