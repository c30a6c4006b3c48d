"""What runs inside the `llm` Triton model, without Triton: the request and output types, the two
engines behind one interface (vLLM, and the project's own reference engine), and the serving loop
that streams their tokens to response streams."""
