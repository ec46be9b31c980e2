"""sessionq benchmarks: every goal measured as a ratio against a raw ceiling in the same run.

Run ``python -m ops.bench`` (full, ~15 min) or ``python -m ops.bench --quick`` (< 1 min).
"""
