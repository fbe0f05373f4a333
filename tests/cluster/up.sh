#!/usr/bin/env bash
# `make cluster`: start etcd + kube-apiserver + kube-controller-manager (v1.20.2) on 127.0.0.1 in the
# background, state in .cluster/ (gitignored). A supervisor (controlplane.py serve) owns the processes;
# down.sh stops it. Every start is a fresh, empty cluster.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
STATE="${DETSTREAM_CLUSTER_DIR:-$ROOT/.cluster}"

running() { [ -f "$STATE/serve.pid" ] && grep -qs controlplane.py "/proc/$(cat "$STATE/serve.pid")/cmdline"; }
if running && [ -f "$STATE/ready" ]; then
  echo "control plane already running at $(cat "$STATE/ready") (make cluster-down to stop)" >&2
else
  bash "$ROOT/tests/cluster/build.sh"   # in the foreground, so a first build shows its progress
  mkdir -p "$STATE"
  rm -f "$STATE/ready" "$STATE/failed"
  # setsid: own session, so a Ctrl-C in this terminal later does not reach it
  setsid python3 "$ROOT/tests/cluster/controlplane.py" serve "$STATE" >"$STATE/serve.log" 2>&1 </dev/null &
  for _ in $(seq 600); do           # up to 150 s
    [ -f "$STATE/ready" ] && break
    if [ -f "$STATE/failed" ] || ! kill -0 $! 2>/dev/null; then
      echo "control plane failed to start; $STATE/serve.log:" >&2; tail -n 40 "$STATE/serve.log" >&2; exit 1
    fi
    sleep 0.25
  done
  [ -f "$STATE/ready" ] || { echo "control plane not ready after 150 s; logs in $STATE/" >&2; exit 1; }
  echo "control plane up at $(cat "$STATE/ready"); logs in $STATE/*.log" >&2
fi
echo "export KUBECONFIG=$STATE/kubeconfig"
