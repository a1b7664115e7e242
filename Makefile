# Two commands for a new user: `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
PYTEST_WORKERS ?= 2

.PHONY: setup demo test fixtures bench clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	@! $(PY) -c "import importlib.util,sys; sys.exit(importlib.util.find_spec('torchvision') is None)" \
		|| (echo "torchvision is installed in $(VENV): it breaks lightning/torchmetrics with a CPU torch; uninstall it" && false)
	touch $@

setup: $(VENV)/.installed

test: setup
	MEDSEG_SLOW=1 $(PY) -m pytest -q -n $(PYTEST_WORKERS) tests

demo: setup
	bash scripts/demo.sh

fixtures: setup
	$(PY) scripts/make_fixtures.py

clean:
	rm -rf $(VENV) build dist .pytest_cache demo_out
