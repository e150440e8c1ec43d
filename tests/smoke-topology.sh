set -x
for n in rt-node rt-cli rt-pod1; do ip netns del $n 2>/dev/null; done
ip netns add rt-node; ip netns add rt-cli; ip netns add rt-pod1
ip netns exec rt-node sysctl -qw net.ipv4.ip_forward=1
ip netns exec rt-node ip link set lo up
ip netns exec rt-node ip addr add 10.244.0.1/32 dev lo
for p in cli:10.244.0.10 pod1:10.244.0.2; do
  name=${p%%:*}; ip=${p#*:}
  ip link add rdp-$name netns rt-node type veth peer name eth0 netns rt-$name
  ip netns exec rt-$name ip link set lo up
  ip netns exec rt-$name ip link set eth0 up
  ip netns exec rt-$name ip addr add $ip/32 dev eth0
  ip netns exec rt-$name ip route add 10.244.0.1 dev eth0
  ip netns exec rt-$name ip route add default via 10.244.0.1
  ip netns exec rt-node ip link set rdp-$name up
  ip netns exec rt-node ip route add $ip dev rdp-$name
done
cat > /tmp/smoke.toml <<EOT
[node]
uplink = []
pod_interfaces = ["rdp-*"]
pin_path = "/sys/fs/bpf/rt-smoke"
activator = "10.244.0.1:8012"
[[service]]
name = "hello"
vip = "10.96.0.10"
port = 80
mode = "serve"
backends = ["10.244.0.2:8080"]
EOT
# IPv6: the node answers neighbour solicitations only for addresses on the receiving
# interface, so pods use a link-local gateway (fe80::1 on every host-side veth).
ip netns exec rt-node sysctl -qw net.ipv6.conf.all.forwarding=1
ip netns exec rt-node ip addr add fd00:244::1/128 dev lo
for p in cli:fd00:244::10 pod1:fd00:244::2; do
  name=${p%%:*}; ip=${p#*:}
  ip netns exec rt-node ip -6 addr add fe80::1/64 dev rdp-$name nodad
  ip netns exec rt-$name ip -6 addr add $ip/128 dev eth0 nodad
  ip netns exec rt-$name ip -6 route add default via fe80::1 dev eth0
  ip netns exec rt-node ip -6 route add $ip dev rdp-$name
done
