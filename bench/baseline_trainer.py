"""Baseline for bench/run.py: a plain transformers Trainer + PEFT LoRA script, the way one
would write it by hand, on the same model directory and data. Prints one JSON line."""

import json
import sys
import time

T0 = time.perf_counter()

import torch  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainerCallback, TrainingArguments  # noqa: E402

model_dir, data_path, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
tok = AutoTokenizer.from_pretrained(model_dir)
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
model = get_peft_model(
    model,
    LoraConfig(
        r=16,
        lora_alpha=32,
        lora_dropout=0.05,
        task_type="CAUSAL_LM",
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    ),
)
rows = [json.loads(x) for x in open(data_path)]
feats = []
for r in rows:
    ids = tok.apply_chat_template(
        [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["completion"]}],
        tokenize=True,
        return_dict=True,
    )["input_ids"]
    feats.append({"input_ids": ids, "labels": ids})


def collate(batch):
    w = max(len(b["input_ids"]) for b in batch)
    ids = torch.full((len(batch), w), tok.pad_token_id)
    lab = torch.full((len(batch), w), -100)
    att = torch.zeros((len(batch), w), dtype=torch.long)
    for i, b in enumerate(batch):
        n = len(b["input_ids"])
        ids[i, :n], lab[i, :n], att[i, :n] = torch.tensor(b["input_ids"]), torch.tensor(b["labels"]), 1
    return {"input_ids": ids, "labels": lab, "attention_mask": att}


class Timer(TrainerCallback):
    first = None
    tokens = 0

    def on_step_begin(self, args, state, control, **kw):
        if self.first is None:
            self.first = time.perf_counter()


timer = Timer()
args = TrainingArguments(
    output_dir="/tmp/shammah-bench-baseline",
    max_steps=steps,
    per_device_train_batch_size=4,
    learning_rate=2e-4,
    report_to="none",
    disable_tqdm=True,
    save_strategy="no",
    logging_strategy="no",
    use_cpu=True,
    remove_unused_columns=False,
    optim="adamw_torch",
)
trainer = Trainer(model=model, args=args, train_dataset=feats, data_collator=collate, callbacks=[timer])
out = trainer.train()
end = time.perf_counter()
tokens = sum(len(f["input_ids"]) for f in feats) * steps * 4 / len(feats)
print(
    json.dumps(
        {"startup_s": timer.first - T0, "train_s": end - timer.first, "tokens_per_s": tokens / (end - timer.first)}
    )
)
