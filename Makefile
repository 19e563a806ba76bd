# Two commands are the whole set-up: `make demo` and `make test` each build .venv first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
JOBS ?= 2

.PHONY: demo test test-all lint bench clean chromium osmesa

# Reinstall only when the project's dependency list changes.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q -U pip wheel
	$(BIN)/pip install -q -e '.[sim,hdf5,datamodel,images,dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/distcur demo $(ARGS)

# The report's browser test needs Chromium (Debian's package); without it that test is skipped.
chromium:
	@command -v chromium >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) \
		|| echo "no chromium: the report's browser test is skipped"

# Rendered MetaWorld frames (ingest metaworld --image-size) render headless with MUJOCO_GL=osmesa,
# which needs OSMesa (Debian's libosmesa6); without it the rendering tests are skipped.
osmesa:
	@ldconfig -p | grep -q libOSMesa || (apt-get update -qq && apt-get install -y -qq libosmesa6 >/dev/null) \
		|| echo "no libosmesa6: the rendered-MetaWorld tests are skipped"

# The whole suite but the slow end-to-end runs (one real end-to-end path stays in).
test: $(STAMP) chromium osmesa
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -m "not slow" $(PYTEST_ARGS)

test-all: $(STAMP) osmesa
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .

bench: $(STAMP)
	for b in benchmarks/bench_*.py; do $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(VENV) distcur-store .pytest_cache
