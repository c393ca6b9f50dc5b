"""The credits service: accounts, plans, an append-only ledger and usage statistics."""
