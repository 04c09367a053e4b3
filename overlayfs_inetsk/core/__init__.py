"""The pure core: image codec, addresses, the map, the tree model, the decision on each
socket and the one planning entry point (plan.py). Imports no pyfuse3, trio, node.rtnl,
ctypes or subprocess (tests/test_layout.py checks)."""
