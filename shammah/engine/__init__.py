"""The engine package: :class:`Engine` (engine.py) is the one boundary the chat, the jobs and the
benchmarks talk to; loader, generate, resolve and fingerprint are its parts."""

from shammah.engine.engine import FALLBACK_SAMPLING, Engine

__all__ = ["FALLBACK_SAMPLING", "Engine"]
