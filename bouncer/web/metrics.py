"""`/metrics` for Prometheus: registered here once built."""


def register(web):
    pass
