"""The errors our code raises for a request that cannot be served; vlmserve.contracts says how they cross models."""


class InvalidRequest(ValueError):
    """The request itself is wrong (bad media, bad parameters, prompt too long)."""


class Unavailable(RuntimeError):
    """Something the request needs cannot be reached now (no ViT server answers): the same request may
    succeed later."""
