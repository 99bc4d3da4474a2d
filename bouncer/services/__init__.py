"""What the doors do on a person's behalf (the CLI, the HTTP API, the console), written once:
cancelling a user batch, failing a Bouncer batch, setting a user's weight, remembering an API
request's Idempotency-Key.
Each action tells the webhook sender when it ends a batch, and an operator's is audited."""
