# Every target creates .venv when it is missing and installs what it needs.
# torch is pinned to 2.13.0 first: that release is a local CPU build here, and
# any looser spec would pull a multi-GB CUDA build.
PY := .venv/bin/python
VENV_STAMP := .venv/.installed

.PHONY: demo test bench venv clean

venv: $(VENV_STAMP)

$(VENV_STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	touch $(VENV_STAMP)

# The CALM KV-arithmetic reproduction (experiments/calm_kv_arithmetic, run from the
# repository root; about 12 minutes on 2 CPU cores):
# progress bars, the accuracy table, out/calm_repro/accuracy.png.
demo: $(VENV_STAMP)
	$(PY) -m experiments.calm_kv_arithmetic --out out/calm_repro

test: $(VENV_STAMP)
	$(PY) -m pytest -n 2 --durations=25 tests

# Timing benchmarks only (experiments/ holds the paper reproductions).
bench: $(VENV_STAMP)
	@for script in benchmarks/[!_]*.py; do echo "== $$script"; $(PY) $$script --quick || exit 1; done

clean:
	rm -rf .venv build *.egg-info
