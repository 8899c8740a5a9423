# The two commands: `make run` (set up and run the appliance) and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
DATA   ?= var/demo
STAMP  := $(VENV)/.installed
TEST_STAMP := $(VENV)/.test-installed
PIP    := $(BIN)/pip --disable-pip-version-check -q

.PHONY: run test test-slow lint bench clean-demo viewer

$(BIN)/python:
	@sh provisioning/ensure-venv.sh "$(PYTHON)" "$(VENV)"

$(STAMP): pyproject.toml | $(BIN)/python
	$(PIP) install -e .
	@touch $@

$(TEST_STAMP): pyproject.toml $(STAMP)
	$(PIP) install -e '.[test]'
	@touch $@

## make viewer: fetch the pinned OHIF viewer once (provisioning/fetch-viewer.sh)
VIEWER_INDEX := appliance/web/static/viewer/index.html
viewer: $(VIEWER_INDEX)
$(VIEWER_INDEX): provisioning/fetch-viewer.sh
	sh provisioning/fetch-viewer.sh

## make run: install, provision a demo site in ./var/demo once, run everything in the foreground
# A site with no way to fetch the viewer still gets a working appliance (DICOM, worklist,
# reports); /viewer then says how to install it.
run: $(STAMP)
	@$(MAKE) --no-print-directory viewer || echo "warning: viewer not installed (see provisioning/fetch-viewer.sh); everything else runs"
	@[ -f "$(DATA)/appliance.yaml" ] || $(BIN)/appliance init --data-dir "$(DATA)" --site-name "Demo site"
	exec $(BIN)/appliance up --data-dir "$(DATA)"

## make test: install test tools (dcmtk, orthanc … via apt when root), lint, run the suite
test: $(TEST_STAMP) viewer
	@sh provisioning/install-test-tools.sh
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -m "not slow" --durations=25  # the slowest 25, to keep the suite near 20 min
	$(BIN)/python -m pytest -q -s -m slow  # once per run: the fresh-machine offline install

test-slow: $(TEST_STAMP)
	@sh provisioning/install-test-tools.sh
	$(BIN)/python -m pytest -q -m slow

lint: $(TEST_STAMP)
	$(BIN)/ruff check .

## make bench: every benchmark, each printing its figures and the peer's from the same run
BENCHMARKS := ingest read_queue web report_delivery dicomweb sync consult forward worklist notify
bench: $(TEST_STAMP) viewer
	@sh provisioning/install-test-tools.sh
	@for b in $(BENCHMARKS); do [ -f benchmarks/$$b.py ] || continue; \
	  echo "== benchmarks/$$b.py"; $(BIN)/python benchmarks/$$b.py || exit 1; done
