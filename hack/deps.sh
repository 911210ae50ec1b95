#!/usr/bin/env bash
# Installs what knit's demo, tests and benchmarks need on a fresh Debian
# machine, idempotently: Debian packages (only the missing ones), Go modules.
# The lab's control plane is built from pinned Go modules on first use and
# cached under .cache/ (see lab/cp).
set -euo pipefail
cd "$(dirname "$0")/.."

export PATH="/usr/local/go/bin:$PATH"
command -v go >/dev/null || { echo "deps: Go not found (expected at /usr/local/go)" >&2; exit 1; }

# iproute2/util-linux: netns, unshare, nsenter. nftables/iptables: the data
# plane's userspace tools (knftables runs nft). The rest are benchmark and
# test clients.
pkgs=(iproute2 iputils-ping util-linux nftables iptables conntrack iperf3 wrk nginx-light dnsperf dnsutils curl procps kmod)
missing=()
for p in "${pkgs[@]}"; do
	dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
	echo "deps: installing ${missing[*]}"
	SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
	$SUDO apt-get update -qq
	DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
	# nginx-light starts a system nginx on port 80 of the real machine; the
	# benchmarks run their own nginx inside the sandbox, so stop that one.
	if [[ " ${missing[*]} " == *" nginx-light "* ]]; then
		$SUDO systemctl disable --now nginx >/dev/null 2>&1 || $SUDO service nginx stop >/dev/null 2>&1 || true
	fi
fi

go mod download
(cd lab/controlplane && go mod download)
