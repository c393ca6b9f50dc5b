"""Real servers that stand in for the outside world in tests (network faults, providers)."""
