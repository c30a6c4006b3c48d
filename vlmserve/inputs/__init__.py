"""The input side of the `vlm` model: a client's request (chat messages or a text prompt, media bytes,
sampling options) -> what the engine generates from (prompt ids, media embeddings from the vision models,
sampling options with the server's defaults), without Triton."""
