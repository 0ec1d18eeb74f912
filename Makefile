# `make test` and `make demo` work on a fresh machine: they create .venv and install what they need.
PY ?= python3
VENV ?= .venv
PIP := $(VENV)/bin/pip
TORCH_PIN := torch==2.13.0

.PHONY: test demo install install-demo proto lint clean

$(VENV)/bin/python:
	$(PY) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

# torch first and pinned: any other version pulls a multi-GB CUDA build on this machine.
$(VENV)/.installed-dev: pyproject.toml | $(VENV)/bin/python
	$(PIP) install -q $(TORCH_PIN)
	$(PIP) install -q -e '.[dev]'
	touch $@

$(VENV)/.installed-demo: pyproject.toml | $(VENV)/bin/python
	$(PIP) install -q $(TORCH_PIN)
	$(PIP) install -q -e '.[demo]'
	touch $@

install: $(VENV)/.installed-dev

test: $(VENV)/.installed-dev
	$(VENV)/bin/python -m pytest -q $(PYTEST_ARGS)

demo: $(VENV)/.installed-demo
	$(VENV)/bin/fl-plugins run recipes/peft_sentiment.yaml

proto: $(VENV)/.installed-dev
	$(VENV)/bin/python -m grpc_tools.protoc -Ifl_plugins/wire/proto --python_out=fl_plugins/wire/proto \
		--pyi_out=fl_plugins/wire/proto fl_plugins/wire/proto/fl.proto

lint: $(VENV)/.installed-dev
	$(VENV)/bin/ruff check fl_plugins tests benchmarks examples

clean:
	rm -rf $(VENV) .pytest_cache runs
