# The two commands of the README; both set up .venv first (scripts/install.sh is idempotent).
.PHONY: install train test lint

install:
	bash scripts/install.sh

train: install
	.venv/bin/giantpipe-train $(ARGS)

# One pytest worker per core, each taking whole test modules (--dist loadfile): a module's
# shared runs (module-scoped fixtures) are made once.
test: install
	WANDB_MODE=offline .venv/bin/python -m pytest -q -n auto --dist loadfile $(ARGS)

lint: install
	.venv/bin/ruff check src tests scripts
