"""Adapters on disk: the registry (and, later, .expert packages)."""
