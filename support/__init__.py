"""What the tools around the product share: the tests, the soak run, the throughput and bench
scripts. Ports, the service's own processes, throwaway servers, and the checks of design.md's
invariants. Nothing here is part of the service; it imports the service, never the reverse."""
