# Two commands on a fresh machine:  `make demo` (install + the main job) and `make test` (install + tests).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo demo-check test test-fast lint clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check torch==2.13.0
	$(PY) -m pip install -q --disable-pip-version-check -e '.[dev,plot]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/lessctl demo

lint: $(STAMP)
	$(VENV)/bin/ruff check lessctl tests bench tools
	$(VENV)/bin/ruff format --check lessctl tests bench tools

# the README's demo tables against a fresh run (`tools/demo_readme.py REPORT --write` puts a run's tables in)
demo-check: $(STAMP)
	$(VENV)/bin/lessctl demo --dir lessctl-demo --fresh --json > lessctl-demo.json
	$(PY) tools/demo_readme.py lessctl-demo.json

test: $(STAMP)
	$(VENV)/bin/pytest -q

test-fast: $(STAMP)
	$(VENV)/bin/pytest -q -m "not slow and not slurm"

clean:
	rm -rf $(VENV) lessctl-demo lessctl-demo.json .pytest_cache
