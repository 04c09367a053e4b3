"""The planner: the one pipeline from (map sources, options, the node's addresses) to what
every adapter serves, writes or checks (planner.py); where the map comes from (sources.py).
"""
