# The two commands of the README; both set up .venv first (scripts/install.sh is idempotent).
.PHONY: install train test lint

install:
	bash scripts/install.sh

train: install
	.venv/bin/giantpipe-train $(ARGS)

test: install
	WANDB_MODE=offline .venv/bin/python -m pytest -q $(ARGS)

lint: install
	.venv/bin/ruff check src tests scripts
