"""A local Bouncer, so the service runs with no account and no network (`python -m bouncer sandbox`).

simulator.py is Bouncer itself (verdicts, batches, faults, controls), server.py carries it over
real HTTP or behind `responses`, options.py declares its options once. Standard library only.
The soak script classifies request-log lines with parse_route and request_kind, as the simulator
does.
"""
from .options import SandboxOptions
from .server import Sandbox
from .simulator import parse_route, request_kind

__all__ = ["Sandbox", "SandboxOptions", "parse_route", "request_kind"]
