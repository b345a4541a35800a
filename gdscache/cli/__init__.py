"""The ``gdscache`` command line: bench, ls, stats, verify, gc, calibrate."""
