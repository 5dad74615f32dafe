"""Planning: prefix tree, groups and their order, computed before any model runs."""
