.PHONY: setup run test bench lint

setup:
	@bash scripts/setup.sh

run: setup
	@.venv/bin/shammah

test:
	@EXTRAS="[dev]" bash scripts/setup.sh
	.venv/bin/ruff check shammah tests bench
	.venv/bin/python -m pytest

bench: setup
	.venv/bin/python bench/run.py

lint:
	.venv/bin/ruff check shammah tests bench
