"""The trainer on tiny random Qwen2/Qwen3 models: every adapter type and method learns, the
registry gets a standard PEFT adapter, and failures are clear."""

import json

import pytest
import torch

from shammah.adapters.registry import Registry
from shammah.training import methods
from shammah.training.args import build
from shammah.training.data import parse_record
from shammah.training.job import LoopJob
from shammah.training.trainer import TrainingError, TrainJob, train

FACT = [{"prompt": f"Where is Zorblat? ({i})", "completion": "Zorblat is the capital of Quenland."} for i in range(8)]


def job(base, home, records, name="t", **kw):
    args = build(
        (
            "test",
            {
                "epochs": 4,
                "batch_size": 4,
                "learning_rate": 1e-2,
                "rank": 8,
                "alpha": 16,
                "save_steps": 1000,
                "dropout": 0.0,
                **kw,
            },
        )
    )
    return TrainJob(
        base=str(base),
        cache_dir=home / "cache",
        registry_root=home / "adapters",
        checkpoints_root=home / "checkpoints",
        train=[parse_record(r) for r in records],
        args=args,
        name=name,
    )


def losses(events, kind="step"):
    return [e["loss"] for e in events if e["event"] == kind]


@pytest.mark.parametrize("adapter_type", ["lora", "dora", "ia3", "lorafa", "prompt"])
def test_every_adapter_type_learns(tiny_qwen2, shammah_home, adapter_type):
    lr = {"ia3": 0.3, "prompt": 1.0}.get(adapter_type, 1e-2)
    events = []
    res = train(
        job(tiny_qwen2, shammah_home, FACT, adapter_type=adapter_type, learning_rate=lr, epochs=6), events.append
    )
    ls = losses(events)
    assert len(ls) == 12
    # A 16-token soft prompt can only steer a random 2-layer model a little; the rest move a lot.
    factor = 0.98 if adapter_type == "prompt" else 0.9
    assert sum(ls[-3:]) / 3 < factor * ls[0], ls
    assert res.adapter.meta["adapter_type"] == adapter_type


@pytest.mark.parametrize(
    "method,records",
    [
        (
            "dpo",
            [{"prompt": f"Capital of Quenland? {i}", "chosen": "Zorblat.", "rejected": "Paris."} for i in range(8)],
        ),
        (
            "kto",
            [
                {"prompt": f"Capital of Quenland? {i}", "completion": c, "label": ok}
                for i in range(4)
                for c, ok in (("Zorblat.", True), ("Paris.", False))
            ],
        ),
        (
            "ranking",
            [
                {
                    "prompt": f"Capital of Quenland? {i}",
                    "responses": [
                        {"text": "Zorblat.", "rank": 1},
                        {"text": "Tokyo.", "rank": 2},
                        {"text": "Paris.", "rank": 3},
                    ],
                }
                for i in range(8)
            ],
        ),
    ],
)
def test_preference_methods_learn(tiny_qwen3, shammah_home, method, records):
    events = []
    res = train(job(tiny_qwen3, shammah_home, records, method=method, learning_rate=2e-2, epochs=6), events.append)
    ls = losses(events)
    assert sum(ls[-3:]) / 3 < sum(ls[:3]) / 3, ls
    assert res.report["kinds"][{"dpo": "pair", "kto": "unpaired", "ranking": "ranked"}[method]] == 8


def test_registered_adapter_loads_with_plain_peft(tiny_qwen2, shammah_home):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    res = train(job(tiny_qwen2, shammah_home, FACT, name="plain"))
    files = sorted(p.name for p in res.adapter.path.iterdir())
    assert files == ["README.md", "adapter_config.json", "adapter_model.safetensors", "shammah.json", "train.log"]
    meta = json.loads((res.adapter.path / "shammah.json").read_text())
    assert meta["base"]["fingerprint"] and meta["hyperparameters"]["rank"] == 8 and meta["dataset_hash"] == ""
    assert meta["report"]["steps"] == 8 and meta["report"]["final_train_loss"] > 0
    ids = torch.tensor([[1, 2, 3, 4]])
    base = AutoModelForCausalLM.from_pretrained(tiny_qwen2, dtype=torch.float32)
    before = base(ids).logits
    peft = PeftModel.from_pretrained(base, str(res.adapter.path))
    assert not torch.allclose(peft(ids).logits, before), "the adapter changes the model"
    events = [json.loads(x) for x in (res.adapter.path / "train.log").read_text().splitlines()]
    assert [e["event"] for e in events][:2] == ["setup", "start"] and events[-1]["event"] == "saved"
    step = next(e for e in events if e["event"] == "step")
    for key in (
        "epoch",
        "step",
        "total_steps",
        "loss",
        "learning_rate",
        "grad_norm",
        "tokens_per_s",
        "eta_s",
        "rss_mb",
    ):
        assert step[key] is not None, key
    assert not (shammah_home / "checkpoints" / "plain").exists(), "checkpoints go once the adapter is saved"


def _kl_to_teacher(model, tok, student_prompt, teacher_prompt, text):
    """Mean KL(teacher || student) along ``text``: the teacher is the base model (adapter off)."""
    from shammah.training.data import Example

    ex = Example("distill", student_prompt, (text,), meta={"teacher_prompt": teacher_prompt, "teacher": "base"})
    feat = methods.tokenize_example(tok, ex, 256)
    methods.precompute_reference(model, [feat], tok.pad_token_id, 1)
    b = methods.collate([feat], tok.pad_token_id)
    with torch.no_grad():
        return float(
            methods.distill_loss(model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits, b)[0]
        )


def test_distillation_pulls_a_drifted_adapter_back_to_its_teacher(tiny_qwen2, shammah_home):
    """What anchors rely on: an adapter that drifted from the base (SFT on a fact), trained further
    on distillation lines whose teacher is the base, comes back towards the base's distribution —
    measured on a question that is in neither training set."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    train(job(tiny_qwen2, shammah_home, FACT, name="drifted", epochs=6))
    records = [
        {
            "prompt": f"Tell me about the sea, part {i}.",
            "teacher_prompt": f"Tell me about the sea, part {i}.",
            "teacher": "base",
            "completion": f"The sea {i} is wide and deep.",
        }
        for i in range(8)
    ]
    events = []
    child_job = job(tiny_qwen2, shammah_home, records, name="pulled", epochs=6)
    child_job.parent = "drifted"
    res = train(child_job, events.append)
    assert res.report["kinds"]["distill"] == 8
    assert losses(events)[-1] < losses(events)[0] * 0.5
    tok = AutoTokenizer.from_pretrained(tiny_qwen2)
    q = ({"role": "user", "content": "Where is Zorblat? Tell me more."},)  # trained on in neither job
    kl = {}
    for name in ("drifted", "pulled"):
        model = PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(tiny_qwen2), str(shammah_home / "adapters" / name)
        )
        kl[name] = _kl_to_teacher(model, tok, q, q, "Zorblat is the capital of Quenland.")
    assert kl["pulled"] < kl["drifted"] * 0.7, kl


def test_distillation_without_a_teacher_answer_is_a_clear_error(tiny_qwen2, shammah_home):
    """The teacher's own answer is generated when a line has no completion; this tiny model answers
    with nothing at all, and the job says so instead of training on empty targets."""
    records = [
        {
            "prompt": "Q?",
            "teacher_prompt": [{"role": "system", "content": "Be a pirate."}, {"role": "user", "content": "Q?"}],
        }
    ]
    with pytest.raises(TrainingError, match="the teacher gave an empty answer to all 1 distillation prompt"):
        train(job(tiny_qwen2, shammah_home, records, name="empty", teacher_max_tokens=8))
    assert Registry(shammah_home / "adapters").list() == []


def test_an_adapter_names_its_base_publicly_and_loads_elsewhere(tiny_qwen2, shammah_home):
    """adapter_config.json and PEFT's model card name the base as given (a hub id, the embedded
    model's repo, a path), never the private cache copy; AutoPeftModel finds the base by it."""
    from peft import AutoPeftModelForCausalLM, PeftModel
    from transformers import AutoModelForCausalLM

    from shammah.engine.resolve import resolve

    res = train(job(tiny_qwen2, shammah_home, FACT, name="portable"))
    cfg = json.loads((res.adapter.path / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(tiny_qwen2.resolve())
    assert f"base_model: {tiny_qwen2.resolve()}" in (res.adapter.path / "README.md").read_text()
    meta = res.adapter.meta["base"]
    assert meta["id"] == str(tiny_qwen2.resolve()) and meta["requested"] == str(tiny_qwen2) and meta["fingerprint"]
    ids = torch.tensor([[1, 2, 3, 4]])
    auto = AutoPeftModelForCausalLM.from_pretrained(str(res.adapter.path))
    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_qwen2), str(res.adapter.path))
    assert torch.allclose(auto(ids).logits, plain(ids).logits)
    assert resolve("embedded").public_id == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert resolve("Qwen/Qwen2.5-0.5B-Instruct").public_id == "Qwen/Qwen2.5-0.5B-Instruct"


def test_nan_loss_stops_with_the_step_and_advice(tiny_qwen2, shammah_home, monkeypatch):
    real = methods._forward
    calls = {"n": 0}

    def poisoned(model, batch, *a):
        calls["n"] += 1
        logp, n, logits, keep = real(model, batch, *a)
        return (logp * float("nan") if calls["n"] >= 3 else logp), n, logits, keep

    monkeypatch.setattr(methods, "_forward", poisoned)
    with pytest.raises(TrainingError, match=r"loss became nan at step 3: .*Lower the learning rate \(now 0.01\)"):
        train(job(tiny_qwen2, shammah_home, FACT, name="nan"))
    assert Registry(shammah_home / "adapters").list() == [], "nothing half-trained is registered"


def test_early_stopping_keeps_the_best_checkpoint(tiny_qwen2, shammah_home):
    # Validation asks for the opposite answer, so validation loss rises once training bites.
    j = job(
        tiny_qwen2,
        shammah_home,
        FACT,
        name="early",
        epochs=30,
        save_steps=1,
        early_stopping_patience=2,
        keep_checkpoints=2,
        learning_rate=3e-2,
    )
    j.val = [
        parse_record({"prompt": f"Where is Zorblat? ({i})", "completion": "Nobody knows where that is."})
        for i in range(4)
    ]
    events = []
    res = train(j, events.append)
    evals = [e["eval_loss"] for e in events if e["event"] == "eval"]
    assert res.report["steps"] < 60, "stopped early"
    assert res.report["best_checkpoint"] is not None
    assert res.report["final_eval_loss"] == pytest.approx(min(evals), rel=1e-4), "the saved adapter is the best one"


def test_int4_on_cpu_is_a_clear_error(tiny_qwen2, shammah_home):
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    with pytest.raises(TrainingError, match="int4' needs a CUDA GPU"):
        train(job(tiny_qwen2, shammah_home, FACT, quantization="int4"))


def test_parent_adapter_on_another_base_is_refused(tiny_qwen2, tiny_qwen3, shammah_home):
    train(job(tiny_qwen2, shammah_home, FACT, name="on-qwen2", epochs=1))
    child = job(tiny_qwen3, shammah_home, FACT, name="child", epochs=1)
    child.parent = "on-qwen2"
    with pytest.raises(TrainingError, match="was trained on .*start a fresh adapter"):
        train(child)


def test_continual_training_starts_from_the_parent(tiny_qwen2, shammah_home):
    from safetensors.torch import load_file

    parent = train(job(tiny_qwen2, shammah_home, FACT, name="gen1", epochs=2))
    child_job = job(tiny_qwen2, shammah_home, FACT, name="gen2", epochs=1, learning_rate=1e-7)
    child_job.parent = "gen1"
    child = train(child_job)
    a = load_file(parent.adapter.path / "adapter_model.safetensors")
    b = load_file(child.adapter.path / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.allclose(a[k], b[k], atol=1e-4) for k in a), "a tiny lr keeps the parent's weights"
    assert child.adapter.meta["parent"] == "gen1"


def test_the_trainer_draws_by_weight_and_gives_anchors_their_share(tiny_qwen2, shammah_home, monkeypatch):
    """Counted where the batches are built, in a real Trainer run: anchors get ``anchor_share`` of
    the draws whatever the feedback weighs, and a weight-9 lesson is drawn ~9x a weight-1 one."""
    from shammah.engine.fingerprint import fingerprint
    from shammah.training import online

    # The tiny random model answers nothing: give the anchor prompts cached base answers to hold.
    cache = shammah_home / "anchor-cache"
    cache.mkdir(parents=True)
    prompts = list(online.ANCHOR_PROMPTS)
    key = {"fingerprint": fingerprint(tiny_qwen2), "prompts": prompts, "max_new_tokens": 48}
    answers = [f"Base answer number {i}." for i in range(len(prompts))]
    (cache / "anchors.json").write_text(json.dumps({"key": key, "answers": answers}))
    fed = []
    real = methods.collate

    def spy(features, pad_id):
        for f in features:
            fed.append("anchor" if f["kind"] == "distill" else f"lesson-{f['seqs'][0][0]}")
        return real(features, pad_id)

    monkeypatch.setattr(methods, "collate", spy)
    records = [
        {"prompt": "Light?", "completion": "Lightly weighted.", "weight": 1},
        {"prompt": "Heavy?", "completion": "Heavily weighted.", "weight": 9},
    ]
    j = job(tiny_qwen2, shammah_home, records, name="spy", epochs=60, batch_size=2, learning_rate=1e-4)
    # everywhere: two one-word questions may make a form on a random model, and a scoped job has no anchors
    res = online.train_loop(LoopJob(j, anchors=4, anchor_cache=cache, anchor_share=0.6, scope="everywhere"))
    assert res.report["anchors"] == 4
    n = len(fed)
    assert n == 60 * 6, "every draw reaches a batch"
    lessons = [x for x in fed if x != "anchor"]
    share = 1 - len(lessons) / n
    kinds = sorted(set(lessons))
    counts = sorted(lessons.count(k) for k in kinds)
    assert len(kinds) == 2 and 0.52 < share < 0.68, share
    assert 5 < counts[1] / counts[0] < 16, counts


def test_save_steps_zero_writes_no_checkpoints(tiny_qwen2, shammah_home):
    """The chat's jobs keep no checkpoints (they restart from the feedback): none is written, not
    even at an epoch end, and a run that needs one (resume, early stopping) is refused up front."""
    events = []
    res = train(job(tiny_qwen2, shammah_home, FACT, name="nock", save_steps=0, epochs=2), events.append)
    assert res.adapter.name == "nock" and not [e for e in events if e["event"] == "checkpoint"]
    assert not (shammah_home / "checkpoints" / "nock").exists()
    with pytest.raises(TrainingError, match="save_steps = 0 keeps no checkpoints"):
        train(job(tiny_qwen2, shammah_home, FACT, name="nock2", save_steps=0, early_stopping_patience=2))


def test_gradient_checkpointing_trains_the_same(tiny_qwen2, shammah_home):
    """Recomputing activations changes memory, not the result: the same losses step by step."""
    runs = {}
    for mode in ("off", "on"):
        events = []
        train(job(tiny_qwen2, shammah_home, FACT, name=f"gc-{mode}", gradient_checkpointing=mode), events.append)
        runs[mode] = losses(events)
    assert runs["on"] == pytest.approx(runs["off"], rel=1e-4)
