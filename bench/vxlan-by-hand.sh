#!/usr/bin/env bash
# The kernel's VXLAN path against direct routing, without knit: two node
# netns on an underlay bridge, a pod netns behind each, one iperf3 stream
# from pod 1 to pod 2. It is the control for BenchmarkOverlay: if knit's
# ratio matches this one, the gap is the kernel's, not knit's.
#
#   bench/vxlan-by-hand.sh direct|vxlan [perNodeCPU] [cc]
#
# perNodeCPU: RPS on each node's eth0 steers node1's receive processing to
# CPU 0 and node2's to CPU 1, client pinned to CPU 0, server to CPU 1 (as
# BenchmarkOverlay's "each node's packet processing on its own CPU").
# cc: TCP congestion control for iperf3 -C (default: the machine's).
# Prints the Gbit/s received.
#
# It re-runs itself in a private `unshare --net --mount` sandbox: every
# link, address, route and rule it makes lives and dies there.
set -euo pipefail
if [ "${KNIT_BY_HAND_SANDBOX:-}" != 1 ]; then
	exec env KNIT_BY_HAND_SANDBOX=1 unshare --net --mount --fork "$0" "$@"
fi
mode=${1:?direct or vxlan}
split=${2:-}
cc=${3:-}

mount --make-rprivate /
mount -t tmpfs none /run
mkdir -p /run/netns
ip link set lo up
ip link add br0 type bridge
ip link set br0 up
for i in 1 2; do
	ip netns add "n$i"
	ip link add eth0 netns "n$i" type veth peer name "veth$i"
	ip link set "veth$i" master br0 up
	ip -n "n$i" addr add "198.18.0.$i/24" dev eth0
	ip -n "n$i" link set eth0 up
	ip -n "n$i" link set lo up
	ip netns exec "n$i" sysctl -qw net.ipv4.ip_forward=1
	ip netns add "p$i"
	ip link add eth0 netns "p$i" type veth peer name "pv$i" netns "n$i"
	ip -n "p$i" link set lo up
	ip -n "p$i" link set eth0 up
	ip -n "n$i" link set "pv$i" up
	ip -n "p$i" addr add "10.42.$i.2/24" dev eth0
	ip -n "n$i" addr add "10.42.$i.1/24" dev "pv$i"
	ip -n "p$i" route add default via "10.42.$i.1"
	# Conntrack loaded as on a knit node (egress masquerade).
	ip netns exec "n$i" nft -f - <<'NFT'
table inet nat {
	chain post {
		type nat hook postrouting priority srcnat;
		ip saddr 10.42.0.0/16 ip daddr != 10.42.0.0/16 masquerade
	}
}
NFT
done

case "$mode" in
direct)
	ip -n n1 route add 10.42.2.0/24 via 198.18.0.2
	ip -n n2 route add 10.42.1.0/24 via 198.18.0.1
	;;
vxlan)
	# As knit's overlay makes it (overlay/reconcile.go): learning off,
	# outer UDP checksum on, static FDB, neighbour and onlink route.
	for i in 1 2; do
		ip -n "n$i" link add vx type vxlan id 1 local "198.18.0.$i" dev eth0 dstport 8472 nolearning udpcsum
		ip -n "n$i" link set vx mtu 1450 up
		ip -n "n$i" addr add "10.42.$i.0/32" dev vx
		ip -n "p$i" link set eth0 mtu 1450
	done
	mac() { ip -n "$1" -o link show vx | grep -o 'link/ether [0-9a-f:]*' | cut -d' ' -f2; }
	m1=$(mac n1) m2=$(mac n2)
	ip -n n1 neigh add 10.42.2.0 lladdr "$m2" dev vx nud permanent
	ip -n n2 neigh add 10.42.1.0 lladdr "$m1" dev vx nud permanent
	bridge -n n1 fdb add "$m2" dev vx dst 198.18.0.2
	bridge -n n2 fdb add "$m1" dev vx dst 198.18.0.1
	ip -n n1 route add 10.42.2.0/24 via 10.42.2.0 dev vx onlink
	ip -n n2 route add 10.42.1.0/24 via 10.42.1.0 dev vx onlink
	;;
*)
	echo "mode $mode: want direct or vxlan" >&2
	exit 2
	;;
esac

pin1=() pin2=()
if [ "$split" = perNodeCPU ]; then
	ip netns exec n1 sh -c 'echo 1 > /sys/class/net/eth0/queues/rx-0/rps_cpus'
	ip netns exec n2 sh -c 'echo 2 > /sys/class/net/eth0/queues/rx-0/rps_cpus'
	pin1=(taskset -c 0) pin2=(taskset -c 1)
fi
ccargs=()
[ -n "$cc" ] && ccargs=(-C "$cc")
ip netns exec p2 "${pin2[@]}" iperf3 -s -D -1 >/dev/null
sleep 0.3
ip netns exec p1 "${pin1[@]}" iperf3 -c 10.42.2.2 -t 5 -O 1 -J "${ccargs[@]}" |
	python3 -c 'import json,sys; print("%.2f" % (json.load(sys.stdin)["end"]["sum_received"]["bits_per_second"]/1e9))'
