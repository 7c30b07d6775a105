"""SQLite: one database for conversations, turns, feedback (and later, jobs).

The schema changes only through :data:`MIGRATIONS`, an append-only list of
named steps; the names applied are recorded in ``_migrations``. Every write
commits with ``synchronous=FULL`` in WAL mode before the caller acknowledges
anything to the user, so a SIGKILL right after an acknowledgement loses nothing.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path

from shammah.errors import ShammahError
from shammah.paths import ensure_dir, touch_private


def _exec_script(db: sqlite3.Connection, script: str) -> None:
    # executescript() would COMMIT our open transaction first; run statement by statement instead.
    for stmt in script.split(";"):
        if stmt.strip():
            db.execute(stmt)


def _m001_initial(db: sqlite3.Connection) -> None:
    _exec_script(
        db,
        """
        CREATE TABLE conversations (
            id INTEGER PRIMARY KEY,
            created_at REAL NOT NULL,
            system_prompt TEXT,
            model TEXT NOT NULL
        );
        CREATE TABLE turns (
            id INTEGER PRIMARY KEY,
            conversation_id INTEGER NOT NULL REFERENCES conversations(id),
            created_at REAL NOT NULL,
            messages TEXT NOT NULL,      -- JSON: the exact context the model saw
            prompt TEXT NOT NULL,
            reply TEXT NOT NULL,
            model TEXT NOT NULL,
            adapter TEXT,                -- adapter that produced the reply (NULL = base)
            finish_reason TEXT NOT NULL,
            new_tokens INTEGER NOT NULL,
            seconds REAL NOT NULL
        );
        CREATE INDEX turns_conversation ON turns(conversation_id);
        CREATE TABLE feedback (
            id INTEGER PRIMARY KEY,
            turn_id INTEGER NOT NULL REFERENCES turns(id),
            created_at REAL NOT NULL,
            rating TEXT NOT NULL CHECK (rating IN ('good', 'medium', 'critical', 'fix')),
            note TEXT,
            fix TEXT,
            weight REAL NOT NULL
        );
        CREATE INDEX feedback_turn ON feedback(turn_id);
        """,
    )


def _m002_learning(db: sqlite3.Connection) -> None:
    _exec_script(
        db,
        """
        ALTER TABLE feedback ADD COLUMN fix_source TEXT;       -- 'user' (/fix) or 'revision' (accepted rewrite)
        ALTER TABLE feedback ADD COLUMN revision TEXT;         -- the engine's rewrite guided by the note
        ALTER TABLE feedback ADD COLUMN revision_status TEXT;  -- pending | accepted | rejected
        ALTER TABLE feedback ADD COLUMN trained_in TEXT;       -- first adapter trained on it (NULL = in the buffer)
        ALTER TABLE feedback ADD COLUMN changed_at REAL;       -- last fix/revision: newer than a job's snapshot = retrain
        CREATE TABLE jobs (
            id TEXT PRIMARY KEY,
            created_at REAL NOT NULL,
            finished_at REAL,
            status TEXT NOT NULL,  -- queued | running | done | failed | cancelled | rejected
            trigger TEXT NOT NULL,
            parent TEXT,
            adapter TEXT,
            feedback_ids TEXT NOT NULL,
            message TEXT
        );
        CREATE TABLE state (key TEXT PRIMARY KEY, value TEXT)
        """,
    )


def _m003_job_owner(db: sqlite3.Connection) -> None:
    # the chat process that runs a job: a 'running' row whose owner is gone was interrupted
    db.execute("ALTER TABLE jobs ADD COLUMN pid INTEGER")


def _m004_serve(db: sqlite3.Connection) -> None:
    # turns.completion_id: the API's chat completion id (shammah serve); jobs.kind: feedback | dataset;
    # jobs.spec: a dataset job's request (JSON), to run it after a restart; jobs.report: the finished
    # job's training report (JSON). (No SQL comments on ALTER lines: SQLite keeps them in the schema.)
    _exec_script(
        db,
        """
        ALTER TABLE turns ADD COLUMN completion_id TEXT;
        CREATE UNIQUE INDEX turns_completion ON turns(completion_id);
        ALTER TABLE jobs ADD COLUMN kind TEXT NOT NULL DEFAULT 'feedback';
        ALTER TABLE jobs ADD COLUMN spec TEXT;
        ALTER TABLE jobs ADD COLUMN report TEXT
        """,
    )


MIGRATIONS: list[tuple[str, Callable[[sqlite3.Connection], None]]] = [
    ("001_initial", _m001_initial),
    ("002_learning", _m002_learning),
    ("003_job_owner", _m003_job_owner),
    ("004_serve", _m004_serve),
]


class DatabaseError(ShammahError):
    """The database file cannot be opened or is not shammah's."""


def connect(path: Path) -> sqlite3.Connection:
    if path.is_dir():
        raise DatabaseError(f"{path} is a directory, not a database; move it away and start again")
    ensure_dir(path.parent)
    touch_private(path)
    try:
        db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30)
        db.row_factory = sqlite3.Row
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.execute("PRAGMA foreign_keys=ON")
        migrate(db)
    except sqlite3.DatabaseError as e:  # "file is not a database", "attempt to write a readonly database", ...
        raise DatabaseError(
            f"{path}: {e}; if it is damaged, move it away (it holds your chats and feedback) and start again, "
            "or make it writable"
        ) from None
    return db


def migrate(db: sqlite3.Connection) -> list[str]:
    """Apply pending migrations in order; return the names applied now."""
    db.execute("CREATE TABLE IF NOT EXISTS _migrations (name TEXT PRIMARY KEY, applied_at REAL)")
    done = {r[0] for r in db.execute("SELECT name FROM _migrations")}
    applied = []
    for name, fn in MIGRATIONS:
        if name in done:
            continue
        db.execute("BEGIN IMMEDIATE")
        try:
            fn(db)
            db.execute("INSERT INTO _migrations VALUES (?, strftime('%s','now'))", (name,))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        applied.append(name)
    return applied
