"""Serving and checking: LoraSession (per-call adapters), output verification."""
