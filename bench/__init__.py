"""Benchmark of cryo-drvae against RELION 3.1.3 and a true-template oracle (``run_bench.py``)."""
