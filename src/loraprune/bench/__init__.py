"""Instruments, not the method: side-by-side tables of criteria, schedules, ratios and patterns
(options.py, grid.py, table.py, sparse.py), peak memory of one scoring step (memory.py,
memory_probe.py) and inference speed (speed.py). Every table states its protocol and command."""
