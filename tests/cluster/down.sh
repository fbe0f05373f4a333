#!/usr/bin/env bash
# `make cluster-down`: stop the control plane started by up.sh (its supervisor stops every component).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
STATE="${DETSTREAM_CLUSTER_DIR:-$ROOT/.cluster}"

pid=$(cat "$STATE/serve.pid" 2>/dev/null || true)
if [ -z "$pid" ] || ! grep -qs controlplane.py "/proc/$pid/cmdline"; then  # also guards against a reused pid
  echo "no control plane running (state dir $STATE)" >&2
  rm -f "$STATE/serve.pid" "$STATE/ready"
  exit 0
fi
kill -TERM "$pid"
for _ in $(seq 120); do             # up to 60 s; the supervisor waits for its children
  kill -0 "$pid" 2>/dev/null || { echo "control plane stopped" >&2; exit 0; }
  sleep 0.5
done
echo "control plane supervisor $pid did not stop within 60 s" >&2
exit 1
