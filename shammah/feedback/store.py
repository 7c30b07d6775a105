"""Durable record of conversations, turns and the user's ratings of them.

Knows nothing about models or terminals. Each method commits before it
returns, so whatever the caller acknowledges is already on disk.
"""

from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

from shammah import db as dbmod
from shammah.config import FeedbackConfig
from shammah.errors import FeedbackError

NEGATIVE = ("medium", "critical")


@dataclass(frozen=True)
class Turn:
    id: int
    conversation_id: int
    prompt: str
    reply: str
    model: str
    adapter: str | None
    finish_reason: str
    messages: list[dict]


@dataclass(frozen=True)
class Feedback:
    id: int
    turn_id: int
    rating: str
    note: str | None
    fix: str | None
    weight: float
    created_at: float
    prompt: str
    reply: str
    messages: tuple[dict, ...] = ()
    fix_source: str | None = None
    revision: str | None = None
    revision_status: str | None = None
    trained_in: str | None = None
    changed_at: float | None = None  # when a fix or revision decision last changed the item


class Store:
    def __init__(self, path: Path, weights: FeedbackConfig | None = None):
        self.path = path
        self.db: sqlite3.Connection = dbmod.connect(path)
        self.weights = weights or FeedbackConfig()

    def close(self) -> None:
        self.db.close()

    # conversations and turns -------------------------------------------------
    def new_conversation(self, model: str, system_prompt: str | None) -> int:
        cur = self.db.execute(
            "INSERT INTO conversations (created_at, system_prompt, model) VALUES (?, ?, ?)",
            (time.time(), system_prompt, model),
        )
        return int(cur.lastrowid)

    def add_turn(
        self,
        conversation_id: int,
        messages: list[dict],
        prompt: str,
        reply: str,
        *,
        model: str,
        adapter: str | None,
        finish_reason: str,
        new_tokens: int,
        seconds: float,
        completion_id: str | None = None,
    ) -> int:
        cur = self.db.execute(
            "INSERT INTO turns (conversation_id, created_at, messages, prompt, reply, model, adapter,"
            " finish_reason, new_tokens, seconds, completion_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                conversation_id,
                time.time(),
                json.dumps(messages, ensure_ascii=False),
                prompt,
                reply,
                model,
                adapter,
                finish_reason,
                new_tokens,
                seconds,
                completion_id,
            ),
        )
        return int(cur.lastrowid)

    def turn_of_completion(self, completion_id: str) -> int | None:
        """The turn an API chat completion was stored as."""
        r = self.db.execute("SELECT id FROM turns WHERE completion_id = ?", (completion_id,)).fetchone()
        return int(r[0]) if r else None

    def turn(self, turn_id: int) -> Turn:
        r = self.db.execute("SELECT * FROM turns WHERE id = ?", (turn_id,)).fetchone()
        if r is None:
            raise FeedbackError(f"no turn #{turn_id}")
        return Turn(
            r["id"],
            r["conversation_id"],
            r["prompt"],
            r["reply"],
            r["model"],
            r["adapter"],
            r["finish_reason"],
            json.loads(r["messages"]),
        )

    def turns(self, conversation_id: int) -> list[Turn]:
        rows = self.db.execute("SELECT id FROM turns WHERE conversation_id = ? ORDER BY id", (conversation_id,))
        return [self.turn(r["id"]) for r in rows.fetchall()]

    def log(self, limit: int = 10, adapter: str | None = None, base_only: bool = False) -> list[dict]:
        """The latest turns (oldest first), each with its ratings: what ``shammah logs`` shows.
        ``adapter`` keeps the turns answered with it; ``base_only`` those answered by the base."""
        where, params = "", []
        if base_only:
            where = "WHERE adapter IS NULL"
        elif adapter is not None:
            where, params = "WHERE adapter = ?", [adapter]
        rows = self.db.execute(
            f"SELECT * FROM turns {where} ORDER BY id DESC" + (" LIMIT ?" if limit else ""),
            params + ([limit] if limit else []),
        ).fetchall()
        out = []
        for r in reversed(rows):
            ratings = self.db.execute(
                "SELECT id, created_at, rating, note, fix, fix_source, weight, revision, revision_status, trained_in"
                " FROM feedback WHERE turn_id = ? ORDER BY id",
                (r["id"],),
            ).fetchall()
            out.append(
                {
                    "id": r["id"],
                    "conversation_id": r["conversation_id"],
                    "created_at": r["created_at"],
                    "model": r["model"],
                    "adapter": r["adapter"],
                    "prompt": r["prompt"],
                    "reply": r["reply"],
                    "finish_reason": r["finish_reason"],
                    "new_tokens": r["new_tokens"],
                    "seconds": r["seconds"],
                    "feedback": [dict(f) for f in ratings],
                }
            )
        return out

    # feedback ----------------------------------------------------------------
    def weight_for(self, rating: str) -> float:
        return float(getattr(self.weights, f"{rating}_weight"))

    def rate(self, turn_id: int, rating: str, note: str | None = None) -> Feedback:
        if rating not in ("good", "medium", "critical"):
            raise FeedbackError(f"unknown rating {rating!r}")
        if rating in NEGATIVE and not (note and note.strip()):
            raise FeedbackError(
                f"/{rating} needs a note saying what was wrong, e.g. /{rating} too long, answer in one line"
            )
        self.turn(turn_id)  # raises if the turn is gone
        cur = self.db.execute(
            "INSERT INTO feedback (turn_id, created_at, rating, note, weight) VALUES (?, ?, ?, ?, ?)",
            (turn_id, time.time(), rating, (note or "").strip() or None, self.weight_for(rating)),
        )
        return self.feedback(int(cur.lastrowid))

    def fix(self, turn_id: int, answer: str) -> Feedback:
        """Record the answer the turn should have had. It is its own item (so /feedback undo takes
        back just the fix); a rewrite still waiting for /accept is superseded by it."""
        if not answer.strip():
            raise FeedbackError("/fix needs the better answer, e.g. /fix The capital of France is Paris.")
        self.turn(turn_id)
        self.db.execute(
            "UPDATE feedback SET revision_status = 'superseded' WHERE turn_id = ? AND revision_status = 'pending'",
            (turn_id,),
        )
        cur = self.db.execute(
            "INSERT INTO feedback (turn_id, created_at, rating, fix, fix_source, weight) VALUES (?, ?, 'fix', ?, 'user', ?)",
            (turn_id, time.time(), answer.strip(), self.weight_for("fix")),
        )
        return self.feedback(int(cur.lastrowid))

    _SELECT = (
        "SELECT f.*, t.prompt AS prompt, t.reply AS reply, t.messages AS messages FROM feedback f"
        " JOIN turns t ON t.id = f.turn_id"
    )

    @staticmethod
    def _row(r: sqlite3.Row) -> Feedback:
        return Feedback(
            r["id"],
            r["turn_id"],
            r["rating"],
            r["note"],
            r["fix"],
            r["weight"],
            r["created_at"],
            r["prompt"],
            r["reply"],
            tuple(json.loads(r["messages"])),
            r["fix_source"],
            r["revision"],
            r["revision_status"],
            r["trained_in"],
            r["changed_at"],
        )

    def feedback(self, feedback_id: int) -> Feedback:
        r = self.db.execute(f"{self._SELECT} WHERE f.id = ?", (feedback_id,)).fetchone()
        if r is None:
            raise FeedbackError(f"no feedback #{feedback_id} (see /feedback list)")
        return self._row(r)

    def list_feedback(self) -> list[Feedback]:
        return [self._row(r) for r in self.db.execute(f"{self._SELECT} ORDER BY f.id").fetchall()]

    def turn_feedback(self, turn_id: int) -> list[Feedback]:
        return [self._row(r) for r in self.db.execute(f"{self._SELECT} WHERE f.turn_id = ? ORDER BY f.id", (turn_id,))]

    def undo(self) -> Feedback:
        r = self.db.execute("SELECT id FROM feedback ORDER BY id DESC LIMIT 1").fetchone()
        if r is None:
            raise FeedbackError("no feedback to undo")
        return self.drop(r["id"])

    def drop(self, feedback_id: int) -> Feedback:
        item = self.feedback(feedback_id)
        self.db.execute("DELETE FROM feedback WHERE id = ?", (feedback_id,))
        return item

    # revisions (a negative rating's note turned into a rewritten answer) ---------------
    def set_revision(self, feedback_id: int, text: str) -> Feedback:
        self.db.execute(
            "UPDATE feedback SET revision = ?, revision_status = 'pending' WHERE id = ?", (text, feedback_id)
        )
        return self.feedback(feedback_id)

    def resolve_revision(
        self, feedback_id: int, accept: bool, text: str | None = None, *, seen: bool = True
    ) -> Feedback:
        """Accept -> the rewrite (or the user's edit of it) becomes the item's fix; reject -> the
        reply stays an undesirable example. ``seen=False``: accepted by a rule, not by a person."""
        item = self.feedback(feedback_id)
        if accept:
            answer = (text or item.revision or "").strip()
            if not answer:
                raise FeedbackError("nothing to accept: the revision is empty; use /fix <better answer>")
            source = "edit" if text else ("revision" if seen else "revision-auto")
            self.db.execute(
                "UPDATE feedback SET revision_status = 'accepted', fix = ?, fix_source = ?,"
                " trained_in = NULL, changed_at = ? WHERE id = ?",
                (answer, source, time.time(), feedback_id),
            )
        else:
            self.db.execute("UPDATE feedback SET revision_status = 'rejected' WHERE id = ?", (feedback_id,))
        return self.feedback(feedback_id)

    def pending_revision(self) -> Feedback | None:
        r = self.db.execute(f"{self._SELECT} WHERE f.revision_status = 'pending' ORDER BY f.id DESC LIMIT 1").fetchone()
        return self._row(r) if r else None

    # training bookkeeping --------------------------------------------------------------
    def mark_trained(self, ids: list[int], adapter: str, snapshot_time: float) -> None:
        """Take items out of the buffer, unless a fix/revision arrived after the job's snapshot."""
        self.db.executemany(
            "UPDATE feedback SET trained_in = ? WHERE id = ? AND trained_in IS NULL"
            " AND (changed_at IS NULL OR changed_at <= ?)",
            [(adapter, i, snapshot_time) for i in ids],
        )

    # training jobs ---------------------------------------------------------------------------
    def job_queued(self, job_id: str, kind: str, trigger: str, spec: dict | None = None) -> None:
        """A job accepted but not started (a dataset job's ``spec`` lets it run after a restart)."""
        import os

        self.db.execute(
            "INSERT INTO jobs (id, created_at, status, trigger, feedback_ids, kind, spec, pid)"
            " VALUES (?, ?, 'queued', ?, '[]', ?, ?, ?)",
            (job_id, time.time(), trigger, kind, json.dumps(spec) if spec is not None else None, os.getpid()),
        )

    def job_started(self, job_id: str, trigger: str, parent: str | None, feedback_ids: list[int]) -> None:
        """A job of this process (its pid marks the owner: a 'running' row whose owner is gone
        was interrupted). A queued row becomes running."""
        import os

        self.db.execute(
            "INSERT INTO jobs (id, created_at, status, trigger, parent, feedback_ids, pid)"
            " VALUES (?, ?, 'running', ?, ?, ?, ?) ON CONFLICT(id) DO UPDATE SET status = 'running',"
            " parent = excluded.parent, feedback_ids = excluded.feedback_ids, pid = excluded.pid, finished_at = NULL",
            (job_id, time.time(), trigger, parent, json.dumps(feedback_ids), os.getpid()),
        )

    def job_finished(
        self, job_id: str, status: str, message: str, adapter: str | None = None, report: dict | None = None
    ) -> None:
        self.db.execute(
            "UPDATE jobs SET status = ?, adapter = ?, message = ?, finished_at = ?,"
            " report = COALESCE(?, report) WHERE id = ?",
            (status, adapter, message, time.time(), json.dumps(report) if report is not None else None, job_id),
        )

    def job(self, job_id: str) -> dict | None:
        r = self.db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return _job_row(r) if r else None

    def jobs(self, limit: int = 100) -> list[dict]:
        """The latest jobs, newest first."""
        rows = self.db.execute("SELECT * FROM jobs ORDER BY created_at DESC, id DESC LIMIT ?", (limit,))
        return [_job_row(r) for r in rows]

    def queued_jobs(self, kind: str) -> list[dict]:
        rows = self.db.execute("SELECT * FROM jobs WHERE status = 'queued' AND kind = ? ORDER BY created_at", (kind,))
        return [_job_row(r) for r in rows]

    def running_jobs(self) -> list[tuple[str, int | None]]:
        """(job id, owner pid) of every job marked running."""
        return [(r["id"], r["pid"]) for r in self.db.execute("SELECT id, pid FROM jobs WHERE status = 'running'")]

    def last_finished_job(self) -> dict | None:
        r = self.db.execute(
            "SELECT * FROM jobs WHERE status IN ('done', 'failed', 'rejected') AND kind = 'feedback'"
            " ORDER BY created_at DESC LIMIT 1"
        ).fetchone()
        return {**dict(r), "feedback_ids": json.loads(r["feedback_ids"])} if r else None

    # small key/value state (the active adapter, ...) --------------------------------------
    def get_state(self, key: str) -> str | None:
        r = self.db.execute("SELECT value FROM state WHERE key = ?", (key,)).fetchone()
        return r[0] if r else None

    def set_state(self, key: str, value: str | None) -> None:
        if value is None:
            self.db.execute("DELETE FROM state WHERE key = ?", (key,))
        else:
            self.db.execute(
                "INSERT INTO state VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value", (key, value)
            )


def _job_row(r: sqlite3.Row) -> dict:
    d = dict(r)
    for k in ("feedback_ids", "spec", "report"):
        d[k] = json.loads(d[k]) if d.get(k) else ([] if k == "feedback_ids" else None)
    return d
