"""Which adapter answers, remembered across restarts: the active one and the one before it
(for ``/adapters rollback``). Kept in the store's state table, so a swap and the feedback that
led to it are in the same database."""

from __future__ import annotations

from shammah.feedback.store import Store

ACTIVE, PREVIOUS = "active_adapter", "previous_adapter"


class ActiveAdapter:
    def __init__(self, store: Store):
        self.store = store

    @property
    def name(self) -> str | None:
        """The adapter the chat answers with (None = the base model)."""
        return self.store.get_state(ACTIVE) or None

    @property
    def previous(self) -> str | None:
        """The one active before it: None when there was none, "" when it was the base model."""
        return self.store.get_state(PREVIOUS)

    def switched(self, old: str | None, new: str | None) -> None:
        """``new`` now answers in place of ``old``."""
        if old != new:
            self.store.set_state(PREVIOUS, old or "")
        self.store.set_state(ACTIVE, new or "")

    def forget(self) -> None:
        """The saved adapter cannot be loaded: start from the base model next time."""
        self.store.set_state(ACTIVE, "")
