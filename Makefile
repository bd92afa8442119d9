# Every target bootstraps .venv by itself (python3 -m venv + pip install -e with what it needs):
# demo installs the project alone, test and test-all its `test` extra, bench its `hf` and `peer`
# extras (the PyTorch and TRL peers). One stamp per install, named after setup.py's checksum:
# editing setup.py reinstalls.
PY := .venv/bin/python
# make bench ROUNDS=3: Kiln and its peer alternated 3 times per bench (eval/bench.py)
ROUNDS ?= 1
SUM := $(shell cksum setup.py | cut -d' ' -f1)
BASE := .venv/.installed-base-$(SUM)
TEST := .venv/.installed-test-$(SUM)
# a comma inside $(call ...) arguments
COMMA := ,
PEERS := .venv/.installed-peers-$(SUM)

.PHONY: demo test test-all bench clean

# $(call install,pip target,stamp prefix)
define install
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '$(1)'
	rm -f .venv/.installed-$(2)-* && touch $@
endef

$(BASE): setup.py
	$(call install,.,base)

$(TEST): setup.py
	$(call install,.[test],test)

$(PEERS): setup.py
	$(call install,.[hf$(COMMA)peer],peers)

demo: $(BASE)
	$(PY) -m train.pipeline --config configs/demo.py --workdir runs/demo

test: $(TEST)
	$(PY) -m ruff check .
	$(PY) -m pytest -q -n 2 -m "not slow" tests

test-all: $(TEST)
	$(PY) -m ruff check .
	$(PY) -m pytest -q -n 2 tests

bench: $(PEERS)
	$(PY) -m eval.bench --rounds $(ROUNDS) --out bench/results.json

clean:
	rm -rf runs .pytest_cache
