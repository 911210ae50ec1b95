#!/usr/bin/env bash
# Runs every benchmark in ./bench: knit side by side with the anchor it must
# beat (reference CNI plugins, kube-proxy, CoreDNS, nginx...), in the same run,
# inside private `unshare --net --mount` sandboxes that the benchmarks create
# themselves. Results go to .cache/bench.log; docs/benchmarks.md records them.
# Finally proves the machine's real root network namespace is unchanged.
# Needs root (netns). BENCH=<regexp> runs a subset, e.g. BENCH=CNI.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="/usr/local/go/bin:$PATH"
start=$(date +%s)

./hack/deps.sh

before=$(mktemp); after=$(mktemp)
trap 'rm -f "$before" "$after"' EXIT
./hack/rootns-snapshot.sh >"$before"

# The sandbox has no uplink: build what needs module downloads first.
echo "== building the lab control plane (cached after the first build)"
go run ./hack/buildcp
# The anchors built inside the sandbox (lab/anchors: CoreDNS) need their
# modules in the cache first.
(cd lab/anchors/coredns && go mod download)

echo "== machine: $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg), kernel $(uname -r), $(go version | cut -d' ' -f3)"
echo "== go test -run '^\$' -bench '${BENCH:-.}' -benchtime 1x -timeout 60m ./bench/..."
mkdir -p .cache
status=0
go test -run '^$' -bench "${BENCH:-.}" -benchtime 1x -timeout 60m ./bench/... 2>&1 | tee .cache/bench.log || status=$?

./hack/rootns-snapshot.sh >"$after"
if ! diff -u "$before" "$after"; then
	echo "FAIL: the real root network namespace changed during the benchmarks" >&2
	status=1
else
	echo "root network namespace unchanged: ok"
fi
echo "== benchmarks took $(( $(date +%s) - start ))s"
exit $status
