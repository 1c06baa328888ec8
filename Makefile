# Two entry points; each sets up .venv first (see scripts/setup.sh).
.PHONY: demo test setup lint

setup:
	@bash scripts/setup.sh

demo: setup
	@.venv/bin/python examples/standard_library.py

test: setup
	@.venv/bin/ruff check attndsl codegen tests examples bench scripts
	@.venv/bin/python -m pytest -q -n 2 tests
