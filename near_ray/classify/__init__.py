"""The classify stage: a whole collection named with a model bundle in one Ray Data job, and the
CLIP -> MLLM cascade that sends only the least confident images to the MLLM (the label stage)."""
