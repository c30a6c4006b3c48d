"""The vision tower's side: its inputs (`inputs`), packing media into calls (`packing`), the embedding
cache (`cache`), and running the exported graph with ONNX Runtime on CPU (`runner`)."""
