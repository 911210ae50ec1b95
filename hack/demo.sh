#!/usr/bin/env bash
# knit's main job in one command: a 3-node lab cluster (real etcd,
# kube-apiserver, kube-controller-manager) with knit as its network, pods on
# every node and a Service, traffic crossing nodes, then teardown. Everything
# runs in a private network sandbox; nothing touches this machine's network.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="/usr/local/go/bin:$PATH"
./hack/deps.sh
mkdir -p .cache/bin
go build -o .cache/bin/knit .
exec .cache/bin/knit lab demo
