"""A real Kubernetes v1.20.2 control plane for tests and developers (see controlplane.py, build.sh)."""
