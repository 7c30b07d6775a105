import json

import pytest

from shammah.training.args import build
from shammah.training.data import (
    DataError,
    check_method,
    dataset_hash,
    load_jsonl,
    parse_record,
    split,
    write_jsonl,
)
from shammah.training.job import LoopJob, TrainJob


def write(tmp_path, lines, name="d.jsonl"):
    p = tmp_path / name
    p.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return p


def test_every_format_is_normalised():
    chat = parse_record(
        {
            "messages": [
                {"role": "system", "content": "S"},
                {"role": "user", "content": "Q"},
                {"role": "assistant", "content": "A"},
            ]
        }
    )
    assert (chat.kind, chat.prompt[-1]["content"], chat.responses) == ("sft", "Q", ("A",))
    instr = parse_record({"instruction": "Translate", "input": "chat", "output": "cat", "weight": 2})
    assert instr.prompt == ({"role": "user", "content": "Translate\n\nchat"},) and instr.weight == 2.0
    comp = parse_record({"prompt": "Q", "completion": "A", "system": "Be brief."})
    assert comp.kind == "sft" and comp.prompt[0] == {"role": "system", "content": "Be brief."}
    pref = parse_record(
        {
            "prompt": [{"role": "user", "content": "Q"}],
            "chosen": [{"role": "assistant", "content": "good"}],
            "rejected": "bad",
        }
    )
    assert (pref.kind, pref.responses) == ("pair", ("good", "bad"))
    lab = parse_record({"prompt": "Q", "completion": "A", "label": False})
    assert (lab.kind, lab.label) == ("unpaired", False)
    ranked = parse_record(
        {
            "prompt": "Q",
            "responses": [
                {"text": "mid", "score": 0.5},
                {"text": "best", "score": 0.9},
                {"text": "worst", "score": 0.1},
            ],
        }
    )
    assert ranked.kind == "ranked" and ranked.responses == ("best", "mid", "worst")
    by_rank = parse_record({"prompt": "Q", "responses": [{"text": "b", "rank": 2}, {"text": "a", "rank": 1}]})
    assert by_rank.responses == ("a", "b")
    dist = parse_record(
        {
            "prompt": "Q",
            "teacher_prompt": [{"role": "system", "content": "Say Ahoy."}, {"role": "user", "content": "Q"}],
        }
    )
    assert (dist.kind, dist.prompt, dist.responses) == ("distill", ({"role": "user", "content": "Q"},), ())
    assert dist.meta == {
        "teacher_prompt": ({"role": "system", "content": "Say Ahoy."}, {"role": "user", "content": "Q"}),
        "teacher": "current",
    }
    given = parse_record({"prompt": "Q", "teacher_prompt": "Q!", "completion": "A", "teacher": "base"})
    assert (given.responses, given.meta["teacher"]) == (("A",), "base")
    with pytest.raises(ValueError, match="'teacher' must be"):
        parse_record({"prompt": "Q", "teacher_prompt": "Q!", "teacher": "gpt"})


def test_bad_lines_are_all_reported_with_file_and_line(tmp_path):
    p = write(
        tmp_path,
        [
            {"prompt": "Q", "completion": "A"},
            "{not json",
            {"prompt": "Q"},
            {"prompt": "Q", "chosen": "x"},
            {"foo": 1},
            {"prompt": "Q", "completion": "A", "weight": -1},
            {"messages": [{"role": "user", "content": "Q"}]},
            {"prompt": "Q", "completion": "A", "label": "yes"},
        ],
    )
    with pytest.raises(DataError) as exc:
        load_jsonl(p)
    msg = str(exc.value)
    assert "7 bad line(s)" in msg and "nothing was trained" in msg
    for line, text in [
        (2, "not valid JSON"),
        (3, "a prompt line needs 'completion'"),
        (4, "a preference line needs both 'chosen' and 'rejected'"),
        (5, "unknown format"),
        (6, "'weight' must be a number > 0"),
        (7, "the last message must be the assistant's"),
        (8, "'label' must be true or false"),
    ]:
        assert f"{p}:{line}: {text}" in msg, (line, msg)


def test_empty_and_missing_files(tmp_path):
    with pytest.raises(DataError, match="no examples"):
        load_jsonl(write(tmp_path, ["", "  "]))
    with pytest.raises(DataError, match="no such file"):
        load_jsonl(tmp_path / "nope.jsonl")


def test_split_is_deterministic_and_disjoint(tmp_path):
    exs = load_jsonl(write(tmp_path, [{"prompt": f"Q{i}", "completion": "A"} for i in range(20)]))
    tr, va = split(exs, 0.25, seed=1)
    assert len(va) == 5 and len(tr) == 15 and not {e.source for e in tr} & {e.source for e in va}
    assert split(exs, 0.25, seed=1) == (tr, va)
    assert split(exs, 0.0, seed=1) == (exs, [])
    with pytest.raises(DataError, match="at least 2 examples"):
        split(exs[:1], 0.5, seed=1)


def test_method_needs_matching_data_and_hash_tracks_content():
    exs = [parse_record({"prompt": "Q", "completion": "A"})]
    with pytest.raises(DataError, match="method = 'dpo' needs preference"):
        check_method(exs, "dpo")
    check_method(exs, "sft")
    other = [parse_record({"prompt": "Q", "completion": "B"})]
    assert dataset_hash(exs) != dataset_hash(other) and dataset_hash(exs) == dataset_hash(list(exs))


ALL_KINDS = [
    {"prompt": "Q", "completion": "A", "system": "Be brief.", "weight": 3},
    {"prompt": "Q", "completion": "A", "meta": {"replaces": "the reply A corrects"}},
    {"prompt": "Q", "chosen": "good", "rejected": "bad"},
    {"prompt": "Q", "completion": "A", "label": False, "weight": 10},
    {"prompt": "Q", "responses": [{"text": "b", "rank": 2}, {"text": "a", "rank": 1}, {"text": "c", "rank": 3}]},
    {"prompt": "Q", "teacher_prompt": "Q, said with a note", "teacher": "base"},
    {"prompt": "Q", "teacher_prompt": "Q!", "completion": "A", "weight": 0.5},
]


def test_written_examples_read_back_the_same(tmp_path):
    """write_jsonl is the inverse of load_jsonl for every kind (the chat's job files rely on it)."""
    examples = [parse_record(r) for r in ALL_KINDS]
    write_jsonl(examples, tmp_path / "out.jsonl")
    back = load_jsonl(tmp_path / "out.jsonl")
    key = [(e.kind, e.prompt, e.responses, e.label, e.weight, e.meta) for e in examples]
    assert [(e.kind, e.prompt, e.responses, e.label, e.weight, e.meta) for e in back] == key


def test_a_loop_job_is_its_file(tmp_path):
    """The chat writes a LoopJob and the worker reads the same LoopJob: every field, nested job,
    training settings, paths and example lists survive, with no dict copied by hand on either side."""
    lj = LoopJob(
        TrainJob(
            base="embedded",
            cache_dir=tmp_path / "cache",
            registry_root=tmp_path / "adapters",
            checkpoints_root=tmp_path / "ckpt",
            train=[parse_record(r) for r in ALL_KINDS],
            args=build(("test", {"rank": 4, "alpha": 8.0, "scheduler": "constant", "target_modules": ["q_proj"]})),
            name="learned-x",
            parent="learned-w",
            meta={"feedback_ids": [1, 2], "holdout_feedback_ids": [3]},
        ),
        anchors=12,
        anchor_loss="sft",
        anchor_span="answer",  # not the default: the round trip must carry it
        anchor_cache=tmp_path / "cache",
        gate=True,
        holdout=[parse_record(ALL_KINDS[0])],
    )
    back = LoopJob.read(lj.write(tmp_path))
    strip = lambda xs: [(e.kind, e.prompt, e.responses, e.weight, e.meta) for e in xs]  # noqa: E731 (source differs)
    assert strip(back.job.train) == strip(lj.job.train) and strip(back.holdout) == strip(lj.holdout)
    assert back.job.val == [] and back.job.args == lj.job.args
    for f in ("base", "cache_dir", "registry_root", "checkpoints_root", "name", "parent", "meta", "resume"):
        assert getattr(back.job, f) == getattr(lj.job, f), f
    for f in ("anchors", "anchor_loss", "anchor_span", "anchor_share", "anchor_cache", "gate"):
        assert getattr(back, f) == getattr(lj, f), f
