import math
from collections import Counter

import pytest
import torch

from shammah.training import methods
from shammah.training.data import parse_record
from shammah.training.methods import IGNORE
from shammah.training.trainer import WeightedSampler


@pytest.fixture(scope="module")
def tok(tiny_qwen2):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_qwen2)


def test_sft_labels_cover_only_the_response_and_end_with_eos(tok):
    ex = parse_record({"system": "Be brief.", "prompt": "Capital of Quenland?", "completion": "Zorblat."})
    feat = methods.tokenize_example(tok, ex, 512)
    [(ids, labels)] = feat["seqs"]
    prompt_ids = tok.apply_chat_template(list(ex.prompt), add_generation_prompt=True, tokenize=True, return_dict=True)[
        "input_ids"
    ]
    n = len(prompt_ids)
    assert ids[:n] == list(prompt_ids)
    assert labels[:n] == [IGNORE] * n, "system and user tokens are masked"
    assert labels[n:] == ids[n:] and ids[-1] == tok.eos_token_id
    assert tok.decode(ids[n:-1]) == "Zorblat."


def test_anchor_targets_leave_the_opening_and_the_end_free(tok):
    """An anchor supervises the content of the base's answer, not how it starts or where it stops."""
    from shammah.training.data import Example

    ex = Example("sft", ({"role": "user", "content": "Capital of France?"},), ("The capital is Paris.",))
    [(ids, labels)] = methods.tokenize_example(tok, ex, 512)["seqs"]
    anchored = Example("sft", ex.prompt, ex.responses, meta={"eos": False, "free_prefix": 3})
    [(a_ids, a_labels)] = methods.tokenize_example(tok, anchored, 512)["seqs"]
    assert a_ids == ids[:-1] and ids[-1] == tok.eos_token_id, "no EOS appended"
    supervised = [i for i, lab in enumerate(a_labels) if lab != IGNORE]
    first = len(a_ids) - len(tok("The capital is Paris.", add_special_tokens=False)["input_ids"])
    assert supervised == list(range(first + 3, len(a_ids))), "the first three answer tokens carry no loss"


def test_truncation_keeps_the_response(tok):
    ex = parse_record({"prompt": "word " * 300, "completion": "Zorblat."})
    [(ids, labels)] = methods.tokenize_example(tok, ex, 64)["seqs"]
    assert len(ids) == 64 and tok.decode([t for t in labels if t != IGNORE][:-1]) == "Zorblat."


def test_collate_pads_every_sequence_and_keeps_the_layout(tok):
    feats = [
        methods.tokenize_example(tok, parse_record(r), 128)
        for r in (
            {"prompt": "Q", "completion": "A"},
            {"prompt": "Q", "chosen": "good answer", "rejected": "bad"},
            {
                "prompt": "Q",
                "responses": [{"text": "a", "rank": 1}, {"text": "b", "rank": 2}, {"text": "c", "rank": 3}],
            },
        )
    ]
    batch = methods.collate(feats, tok.pad_token_id)
    assert batch["input_ids"].shape[0] == 6
    assert [(k, rows) for k, rows, _ in batch["layout"]] == [("sft", [0]), ("pair", [1, 2]), ("ranked", [3, 4, 5])]
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE).all()


def test_losses_match_hand_computed_values():
    pc, pr, rc, rr = torch.tensor([-5.0]), torch.tensor([-7.0]), torch.tensor([-6.0]), torch.tensor([-6.0])
    # margin = (−5+6) − (−7+6) = 2; beta 0.5 -> −log σ(1)
    assert methods.dpo_loss(pc, pr, rc, rr, 0.5).item() == pytest.approx(-math.log(1 / (1 + math.exp(-1))))
    p, r = torch.tensor([-4.0, -4.0]), torch.tensor([-5.0, -3.0])
    desirable = torch.tensor([True, False])
    # ratios 1 and −1; z0 = clamp(mean=0) = 0
    got = methods.kto_loss(p, r, desirable, 1.0, 1.0, 2.0)
    assert got[0].item() == pytest.approx(1 - 1 / (1 + math.exp(-1)))
    assert got[1].item() == pytest.approx(2 * (1 - 1 / (1 + math.exp(-1))))
    # best first: gaps 0.05 (a-b), 1.0 (b-c), 1.05 (a-c); margin 0.1 -> only the first pair is inside the margin
    mean = torch.tensor([-1.0, -1.05, -2.05])
    assert methods.ranking_loss(mean, 0.1).item() == pytest.approx((0.1 - 0.05) / 3)


def test_distill_loss_is_the_kl_to_the_teacher():
    """With the whole vocabulary in the top-k the loss is the exact KL(teacher || student); with a
    smaller k the rest of the teacher's mass is one bucket; zero where the student is the teacher."""
    torch.manual_seed(0)
    V = 7
    teacher, student = torch.randn(1, 3, V), torch.randn(1, 3, V)
    lp, lq = teacher.log_softmax(-1), student.log_softmax(-1)
    mask = torch.tensor([[True, True, False]])  # the last position has no loss

    def batch(k):
        top = lp.topk(k, dim=-1)
        return {"kl_idx": top.indices, "kl_logp": top.values, "kl_mask": mask}

    exact = (lp.exp() * (lp - lq)).sum(-1)[0, :2].mean()
    assert float(methods.distill_loss(student, batch(V))[0]) == pytest.approx(float(exact), rel=1e-5)
    assert float(methods.distill_loss(teacher, batch(V))[0]) == pytest.approx(0.0, abs=1e-6)
    k2 = float(methods.distill_loss(student, batch(2))[0])
    assert 0 < k2 <= float(exact) + 1e-6, "merging the tail can only lower the KL (log-sum inequality)"


def test_weights_are_sampling_probabilities():
    weights = [1.0, 3.0, 10.0, 1.0]
    sampler = WeightedSampler(weights, seed=0)
    counts: Counter = Counter()
    for epoch in range(5000):
        sampler.set_epoch(epoch)
        counts.update(iter(sampler))
    total = sum(counts.values())
    for i, w in enumerate(weights):
        expected = w / sum(weights)
        assert abs(counts[i] / total - expected) < 0.01, (i, counts[i] / total, expected)
    sampler.set_epoch(3)
    assert list(sampler) == list(sampler), "the order is a function of (seed, epoch)"


def test_sft_method_never_trains_undesirable_completions():
    exs = [
        parse_record({"prompt": "Q", "completion": "bad", "label": False}),
        parse_record({"prompt": "Q", "chosen": "good", "rejected": "bad"}),
    ]
    out = methods.as_sft(exs)
    assert [(e.kind, e.responses) for e in out] == [("sft", ("good",))]


@pytest.mark.parametrize("slice_positions", [None, 3])
def test_the_head_on_loss_positions_only_gives_the_same_losses(tiny_qwen2, tok, slice_positions, monkeypatch):
    """The output head runs only where some row has a loss, at once or slice by slice (3 positions
    a slice: many slices, recomputed in the backward pass): every kind's loss and its gradient
    equal those computed from the model's own logits at every position."""
    if slice_positions:
        monkeypatch.setattr(methods, "HEAD_BUDGET", 5 * tok.vocab_size * slice_positions)  # 5 rows
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from shammah.training.args import build

    torch.manual_seed(0)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_qwen2, dtype=torch.float32),
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    )
    recs = [
        {"system": "A long system prompt that makes this row's prompt longer.", "prompt": "Q1?", "completion": "A."},
        {"prompt": "Q2?", "chosen": "Good answer.", "rejected": "Bad."},
        {"prompt": "Q3?", "teacher_prompt": "Q3, kindly?", "completion": "Taught text here.", "teacher": "base"},
        {"prompt": "Q4?", "completion": "Meh.", "label": False},
    ]
    feats = [methods.tokenize_example(tok, parse_record(r), 128) for r in recs]
    methods.precompute_reference(model, feats, tok.pad_token_id, 4)
    batch = methods.collate(feats, tok.pad_token_id)
    kept = methods._forward(model, batch)
    full = methods._forward(model, batch, all_positions=True)
    assert kept[3] is not None and len(kept[3]) < batch["input_ids"].shape[1], "prompt positions are skipped"
    assert torch.allclose(kept[0], full[0], atol=1e-5) and torch.equal(kept[1], full[1])
    assert kept[2] is not None and torch.allclose(kept[2], full[2], atol=1e-6), "the distillation loss per row"
    loss, parts = methods.Objective(build(("t", {})))(model, batch)
    assert set(parts) == {"sft", "dpo", "distill", "kto"}
    loss.backward()
    g_kept = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    model.zero_grad()
    logp, n, _, _ = full
    ref = -(logp[0] / n[0])  # the sft row alone, from every position's logits
    ref.backward()
    g_sft = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    model.zero_grad()
    methods._forward(model, batch)[0][0].neg().div(n[0]).backward()
    assert all(
        torch.allclose(a, p.grad, atol=1e-6)
        for a, p in zip(g_sft, [p for p in model.parameters() if p.requires_grad], strict=True)
    )
    assert any(g.abs().sum() > 0 for g in g_kept)

    def grads_of(loss):
        model.zero_grad()
        loss.backward()
        return [p.grad.clone() for p in model.parameters() if p.requires_grad]

    # the distillation rows' gradient, through the sliced head's recomputation, as from full logits
    g_full = grads_of(methods._forward(model, batch, all_positions=True)[2].sum())
    g_sliced = grads_of(methods._forward(model, batch)[2].sum())
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(g_full, g_sliced, strict=True))
    assert any(g.abs().sum() > 0 for g in g_sliced)


def test_reference_passes_go_by_tokens():
    """Short examples four at a time, long ones alone: a batch of long replies' full-vocabulary
    logits must never be materialised at once."""
    short = {"seqs": [([1] * 50, None)]}
    long = {"seqs": [([1] * 600, None), ([1] * 600, None)]}  # a pair of long replies
    sizes = [len(c) for c in methods._by_tokens([short] * 6 + [long, long, short], 4)]
    assert sizes == [4, 2, 1, 1, 1]
