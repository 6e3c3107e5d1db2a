"""The label stage: prompts, answer parsing, MLLM backends, the simulated annotator."""
