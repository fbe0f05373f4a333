"""A test-only node agent: the scheduler and the kubelet for a real control plane without nodes.

tests/cluster/ starts a real kube-apiserver and kube-controller-manager but no scheduler and no
kubelet, so pods stay Pending. This agent registers a Node, binds the watched namespaces' pending
pods to it and runs each pod's containers as local processes, from the manifests as the API server
holds them: command/args, environment (with downward-API fields and the API server's address), volumes
(the ServiceAccount token at its real path), restart policy, probes.
It reports phase, readiness, restarts, exit codes and termination messages back, resolves
Service names from EndpointSlices, and kills the processes when a pod is deleted. The image name is
ignored: the image is this checkout's Dockerfile, with its installed program taken from the
agent's venv. It is never shipped: it lives under tests/ and is started by tests/test_e2e_cluster.py
(or by hand: `python -m node_agent --help`, from tests/).

What it does not emulate (a manifest relying on these is not tested by it): resource requests and
limits (nothing is reserved or enforced), securityContext (processes run as the agent's user, with
its capabilities; the file system is not read-only), NetworkPolicy, Service ClusterIPs and
kube-proxy (names resolve to the endpoints' pod IPs), image pulls, init containers, startup probes,
exec/attach/logs/port-forward through the API server, termination message files (only
FallbackToLogsOnError). See agent.py, pod.py and container.py for exactly what it does.
"""

from .agent import NodeAgent
from .api import Api

__all__ = ["Api", "NodeAgent"]
