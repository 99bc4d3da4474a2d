"""The tools around the product, run as modules from the repository root:
`python -m scripts.soak`, `python -m scripts.bench`, `python -m scripts.throughput`."""
