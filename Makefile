# Every target bootstraps .venv by itself (python3 -m venv + pip install -e .[test]).
PY := .venv/bin/python
# make bench ROUNDS=3: Kiln and its peer alternated 3 times per bench (eval/bench.py)
ROUNDS ?= 1
STAMP := .venv/.installed-$(shell cksum setup.py | cut -d' ' -f1)

.PHONY: demo test test-all bench clean

$(STAMP): setup.py
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	rm -f .venv/.installed-* && touch $@

demo: $(STAMP)
	$(PY) -m train.pipeline --config configs/demo.py --workdir runs/demo

test: $(STAMP)
	$(PY) -m pytest -q -m "not slow" tests

test-all: $(STAMP)
	$(PY) -m pytest -q tests

bench: $(STAMP)
	$(PY) -m eval.bench --rounds $(ROUNDS) --out bench/results.json

clean:
	rm -rf runs .pytest_cache
