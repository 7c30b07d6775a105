"""shammah: a local-first terminal assistant that learns from the person using it."""

__version__ = "0.1.0"
