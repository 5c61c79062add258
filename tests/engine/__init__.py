"""Integration tests of the webhook engine: MTA client -> bridge -> fake endpoints, on loopback."""
