"""flashsd's benchmarks: `python bench/run.py` (or `make bench`); see bench/run.py."""
