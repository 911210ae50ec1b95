#!/usr/bin/env bash
# Prints the real root network namespace's links, addresses, routes and
# firewall rules in a stable form. hack/test.sh takes one before and one after
# the tests and fails if they differ: proof that nothing escaped the sandbox.
set -uo pipefail
echo "## links"; ip -o link show | sed -E 's/^[0-9]+: //; s/ state [A-Z]+//; s/qlen [0-9]+//' | sort
echo "## addresses"; ip -o addr show | awk '{print $2, $3, $4}' | sort
echo "## routes v4"; ip route show table all | sort
echo "## routes v6"; ip -6 route show table all | grep -v '^local fe80\|^fe80\|^multicast' | sort
echo "## nftables"; nft list ruleset 2>/dev/null | grep -v '^\s*$' || true
echo "## iptables"; iptables-save 2>/dev/null | grep -v '^#' | sed -E 's/\[[0-9]+:[0-9]+\]//' || true
echo "## ip6tables"; ip6tables-save 2>/dev/null | grep -v '^#' | sed -E 's/\[[0-9]+:[0-9]+\]//' || true
echo "## sysctls"; sysctl net.ipv4.ip_forward net.ipv6.conf.all.forwarding net.bridge.bridge-nf-call-iptables 2>/dev/null || true
