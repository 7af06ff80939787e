"""Benchmarks behind `restoration bench <name>`: one module per benchmark (e.g. `restoration.bench.quality`)."""
