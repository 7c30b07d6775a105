"""Named trainings: schema → synthetic data → SFT → preferences → DPO → GGUF → eval (run.py)."""
