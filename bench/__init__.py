"""Benchmarks of lrkernels; shared machinery in bench.harness and bench.plot."""
