"""The label stage: prompts, answer parsing, MLLM backends, the labels table and its ledger."""
