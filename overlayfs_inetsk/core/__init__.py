"""The pure core: the image codec, addresses, the map, the tree model, THE decision on each
socket (decide.py) and the one pass that applies it (plan.py). Bytes, texts and listings in,
records and bytes out: no file system, no terminal, no pyfuse3, trio, netlink, ctypes or
subprocess (tests/test_layout.py checks both its imports and its code)."""
