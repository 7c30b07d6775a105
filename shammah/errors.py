"""Typed, user-facing errors.

Library code raises these; the CLI and the REPL turn each into one clear line
(what failed and what to do next) at the edge — never a traceback.
"""


class ShammahError(Exception):
    """Base class: ``str(err)`` is the complete message shown to the user."""

    not_learned = False  # a training job whose lessons taught nothing (not a failure of the job)


class ConfigError(ShammahError):
    """One or more configuration problems, all listed together."""

    def __init__(self, problems: list[str], source: str = "config"):
        self.problems = problems
        self.source = source
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"invalid {source} ({len(problems)} problem(s)):\n{lines}")


class ModelError(ShammahError):
    """The model could not be found or loaded."""


class FeedbackError(ShammahError):
    """A feedback command could not be applied (nothing to rate, bad id, ...)."""
