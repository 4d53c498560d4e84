# Two commands do all set-up on a fresh machine:  make test   and   make demo
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_PIN := torch==2.13.0

.PHONY: venv test demo lint clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and pinned, so no dependency ever pulls another (CUDA) build.
	$(PY) -m pip install -q "$(TORCH_PIN)"
	echo "$(TORCH_PIN)" > $(VENV)/constraints.txt
	$(PY) -m pip install -q -c $(VENV)/constraints.txt -e ".[dev]"
	touch $@

venv: $(VENV)/.installed

lint: venv
	$(VENV)/bin/ruff check .

test: venv lint
	bash tests/run_tests.sh

demo: venv
	$(PY) -m trainer.demo

clean:
	rm -rf $(VENV) demo_out .pytest_cache
