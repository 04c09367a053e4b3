"""Adapters to this node: namespace address lookups, restore, the group barrier, doctor,
finding CRIU."""
