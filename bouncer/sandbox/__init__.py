"""A local Bouncer, so the service runs with no account and no network (`python -m bouncer sandbox`).

simulator.py is Bouncer itself (verdicts, batches, faults, controls), server.py carries it over
real HTTP or behind `responses`, options.py declares its options once. Standard library only.
The soak script classifies request-log lines with parse_route and request_kind, as the simulator
does. Imported lazily: the CLI reads the options without loading the HTTP server.
"""
from bouncer.sandbox.options import SandboxOptions

__all__ = ["Sandbox", "SandboxOptions", "parse_route", "request_kind"]


def __getattr__(name):
    if name == "Sandbox":
        from bouncer.sandbox.server import Sandbox
        return Sandbox
    if name in ("parse_route", "request_kind"):
        from bouncer.sandbox import simulator
        return getattr(simulator, name)
    raise AttributeError(name)
