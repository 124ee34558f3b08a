# The two commands of the README: `make demo` (the main job) and `make test` (everything CI runs).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test bench bench-faas bench-hugepages soak

demo: $(VENV)/.installed
	$(BIN)/trims demo

test: $(VENV)/.installed
	$(BIN)/python -m pytest -q

bench: $(VENV)/.installed
	$(BIN)/python bench/coldstart.py
	$(BIN)/python bench/tiers.py
	$(BIN)/python bench/transparent.py
	$(BIN)/python bench/assemble.py
	$(BIN)/python bench/threads.py

bench-faas: $(VENV)/.installed
	$(BIN)/python bench/faas/run.py

# Needs root: switches the kernel's shmem_enabled between never and advise, then puts it back.
bench-hugepages: $(VENV)/.installed
	$(BIN)/python bench/hugepages.py

soak: $(VENV)/.installed
	$(BIN)/python bench/soak.py

# torch first, from the CPU build: anything that pulls torch in later would fetch CUDA builds.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[test,bench]'
	touch $@
