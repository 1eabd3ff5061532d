"""Test support shared by the tests, the benchmarks and `make demo`: tiny random-weight checkpoints in the real
Hugging Face layouts and formats, the real denoisers' configs, a runner for the real Cog HTTP server, a fake hub."""
