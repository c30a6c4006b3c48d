"""Errors a Triton model reports back to the caller."""

# Prefix that marks a user mistake in a Triton error message; the proxy maps it to HTTP 400.
INVALID_REQUEST_PREFIX = "invalid_request: "


class InvalidRequest(ValueError):
    """The request itself is wrong (bad media, bad parameters, prompt too long)."""

    def triton_message(self) -> str:
        return INVALID_REQUEST_PREFIX + str(self)
