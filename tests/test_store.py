import os
import stat

import pytest

from shammah import db as dbmod
from shammah.config import FeedbackConfig
from shammah.errors import FeedbackError
from shammah.feedback.compile import buffer
from shammah.feedback.store import Store


@pytest.fixture
def store(shammah_home):
    s = Store(shammah_home / "shammah.db", FeedbackConfig())
    yield s
    s.close()


def _turn(store, prompt="q", reply="a"):
    conv = store.new_conversation("m", None)
    return store.add_turn(
        conv,
        [{"role": "user", "content": prompt}],
        prompt,
        reply,
        model="m",
        adapter="ad-1",
        finish_reason="stop",
        new_tokens=3,
        seconds=0.1,
    )


def test_turn_records_context_and_adapter(store):
    tid = _turn(store, "What is 2+2?", "4")
    t = store.turn(tid)
    assert (t.prompt, t.reply, t.adapter, t.finish_reason) == ("What is 2+2?", "4", "ad-1", "stop")
    assert t.messages == [{"role": "user", "content": "What is 2+2?"}]


def test_ratings_weights_and_buffer(store):
    t1, t2, t3 = _turn(store), _turn(store), _turn(store)
    store.rate(t1, "good")
    store.rate(t2, "medium", "too long")
    store.rate(t3, "critical", "wrong city")
    items = store.list_feedback()
    assert [(f.rating, f.weight) for f in items] == [("good", 1.0), ("medium", 3.0), ("critical", 10.0)]
    assert str(buffer(store)) == "Training buffer: 3 examples (14 weighted)"
    store.rate(t1, "critical", "on second thought, wrong")
    assert str(buffer(store)) == "Training buffer: 3 examples (23 weighted)", "one decision per turn: the latest"


def test_custom_weights(shammah_home):
    s = Store(shammah_home / "w.db", FeedbackConfig(good_weight=2, critical_weight=7))
    t = _turn(s)
    assert s.rate(t, "good").weight == 2 and s.rate(t, "critical", "x").weight == 7
    s.close()


@pytest.mark.parametrize("rating", ["medium", "critical"])
def test_negative_ratings_need_a_note(store, rating):
    t = _turn(store)
    with pytest.raises(FeedbackError, match=f"/{rating} needs a note"):
        store.rate(t, rating, "  ")
    assert buffer(store).examples == 0


def test_fix_is_its_own_item_and_supersedes_a_pending_rewrite(store):
    t1, t2 = _turn(store, reply="Lyon"), _turn(store)
    crit = store.rate(t1, "critical", "wrong city")
    store.set_revision(crit.id, "Marseille.")
    fixed = store.fix(t1, "Paris.")
    assert fixed.id != crit.id and fixed.rating == "fix" and fixed.fix == "Paris." and fixed.weight == 3.0
    assert store.feedback(crit.id).revision_status == "superseded" and store.pending_revision() is None
    alone = store.fix(t2, "Better.")
    assert alone.rating == "fix" and alone.weight == 3.0 and alone.note is None
    with pytest.raises(FeedbackError, match="needs the better answer"):
        store.fix(t2, " ")


def test_undo_and_drop(store):
    t = _turn(store)
    a = store.rate(t, "good")
    b = store.rate(t, "critical", "no")
    assert store.undo().id == b.id
    assert [f.id for f in store.list_feedback()] == [a.id]
    with pytest.raises(FeedbackError, match="no feedback #99"):
        store.drop(99)
    store.drop(a.id)
    with pytest.raises(FeedbackError, match="no feedback to undo"):
        store.undo()


def test_persisted_across_connections_and_private(store, shammah_home):
    t = _turn(store)
    store.rate(t, "critical", "bad")
    again = Store(store.path)
    assert [f.note for f in again.list_feedback()] == ["bad"]
    again.close()
    assert stat.S_IMODE(os.stat(store.path).st_mode) == 0o600


def test_migrations_are_recorded_and_idempotent(shammah_home):
    conn = dbmod.connect(shammah_home / "m.db")
    names = [r[0] for r in conn.execute("SELECT name FROM _migrations ORDER BY name")]
    assert names == [n for n, _ in dbmod.MIGRATIONS]
    assert dbmod.migrate(conn) == []
    conn.close()


def test_failed_migration_rolls_back(shammah_home, monkeypatch):
    def broken(db):
        db.execute("CREATE TABLE half_done (x)")
        raise RuntimeError("boom")

    monkeypatch.setattr(dbmod, "MIGRATIONS", dbmod.MIGRATIONS + [("999_broken", broken)])
    with pytest.raises(RuntimeError):
        dbmod.connect(shammah_home / "r.db")
    conn = dbmod.sqlite3.connect(shammah_home / "r.db")
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert "half_done" not in tables and "feedback" in tables
