"""The operator console at `/` (issue of its own): registered here once built."""


def register(web):
    pass
