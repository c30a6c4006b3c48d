"""Images and videos, from bytes to ViT embeddings: decoding (`decode`), the resize and sampling limits
(`settings`), pixel values and grids (`preprocessing`), and the `vlm` model's encoder, which runs the
`vit_cache`, `preprocess` and `vit` models for a request's media (`encoder`)."""
