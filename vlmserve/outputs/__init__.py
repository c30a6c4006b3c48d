"""The output side of the `vlm` model: the engine's outputs -> what a client's stream carries (text deltas,
logprob entries, the finish reason and usage), without Triton."""
