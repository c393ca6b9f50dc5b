"""Developer tooling: the local stack launcher and the helpers it shares with the tests."""
