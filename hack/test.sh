#!/usr/bin/env bash
# Runs every test of knit: formatting and vet, unit tests, kernel tests in
# throwaway network namespaces, and end-to-end tests against a real control
# plane, all inside private `unshare --net --mount` sandboxes that the tests
# create themselves. Finally proves the machine's real root network namespace
# is unchanged. Installs what it needs (hack/deps.sh). Needs root (netns).
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="/usr/local/go/bin:$PATH"
start=$(date +%s)

./hack/deps.sh

before=$(mktemp); after=$(mktemp)
trap 'rm -f "$before" "$after"' EXIT
./hack/rootns-snapshot.sh >"$before"

echo "== gofmt, go vet"
bad=$(gofmt -l $(git ls-files '*.go' 2>/dev/null || find . -name '*.go' -not -path './.cache/*'))
if [ -n "$bad" ]; then echo "gofmt needed on:"; echo "$bad"; exit 1; fi
go vet ./...

echo "== building the lab control plane (cached after the first build)"
go run ./hack/buildcp

echo "== go test (unit, kernel-in-netns, end-to-end)"
mkdir -p .cache
status=0
go test -count=1 -timeout 40m ./... 2>&1 | tee .cache/test.log || status=$?

./hack/rootns-snapshot.sh >"$after"
if ! diff -u "$before" "$after"; then
	echo "FAIL: the real root network namespace changed during the tests" >&2
	status=1
else
	echo "root network namespace unchanged: ok"
fi
echo "== tests took $(( $(date +%s) - start ))s"
exit $status
