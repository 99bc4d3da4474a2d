"""Bouncer verification queue: greedy batches out to Bouncer, verdicts back."""
__version__ = "2.0.0"
