"""Adapters to this node's tools: CRIU's command line and the signals passed on to it, the
group barrier's protocol, CRIU's iptables lock of the connections, the NAT table of fate
nat (nft) and restore's NAT action script."""
