"""The error our code raises for a request that is itself wrong; vlmserve.contracts says how it crosses models."""


class InvalidRequest(ValueError):
    """The request itself is wrong (bad media, bad parameters, prompt too long)."""
