"""Stand-ins for the outside world: the simulated MLLM annotator and its noise profiles, the synthetic
fine-grained benchmark, and the synthetic pretraining corpus. Only the demo, the CLI, benchmarks and
tests import this package; the product's stages never do."""
