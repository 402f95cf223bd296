# thighnode: the two set-up commands are `make serve` and `make test` (see README).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
CONFIG ?=
PYTEST_ARGS ?=

.PHONY: install serve test test-fast bench demo train-demo evaluate-demo clean viewer-deps viewer-check

# A venv with the pinned torch first (the CPU build on a CPU host, CUDA on a GPU host),
# then the project with its test extras.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --disable-pip-version-check -q torch==2.13.0
	$(BIN)/pip install --disable-pip-version-check -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

# Run the node on its embedded default: SQLite and folders under ./var, CPU if no GPU.
serve: install
	$(BIN)/thighnode serve $(if $(CONFIG),--config $(CONFIG))

test: install
	$(BIN)/pytest $(PYTEST_ARGS)

# The fast subset: everything but the tests marked integration (real node, Orthanc, dcmtk servers).
test-fast: install
	$(BIN)/pytest -m "not integration" $(PYTEST_ARGS)

# The SEG, SR and PDF opened in OHIF in headless Chromium (README "Viewer check"): Debian's chromium and
# orthanc-dicomweb, then tests/viewer's node_modules (npm ci) and the prebuilt OHIF (fetch-ohif.mjs).
VIEWER_APT := $(if $(wildcard /usr/bin/chromium),,chromium) \
	$(if $(wildcard /usr/share/orthanc/plugins/libOrthancDicomWeb.so),,orthanc-dicomweb)
viewer-deps:
	$(if $(strip $(VIEWER_APT)),apt-get update && apt-get install -y --no-install-recommends $(VIEWER_APT))
	cd tests/viewer && npm ci --no-audit --no-fund && node fetch-ohif.mjs

viewer-check: install viewer-deps
	$(BIN)/pytest -m viewer tests/viewer $(PYTEST_ARGS)

bench: install
	$(BIN)/python bench/bench_ingress.py
	$(BIN)/python bench/bench_tls.py
	$(BIN)/python bench/bench_inference.py

# Train the shipped demonstration bundle from phantoms (fixed seed, six stages; see README).
train-demo: install
	$(BIN)/thighnode train config/train_demo.toml
	$(BIN)/thighnode train config/train_demo_stage2.toml
	$(BIN)/thighnode train config/train_demo_stage3.toml
	$(BIN)/thighnode train config/train_demo_stage4.toml
	$(BIN)/thighnode train config/train_demo_stage5.toml
	$(BIN)/thighnode train config/train_demo_stage6.toml
	$(BIN)/thighnode train config/train_demo_stage7.toml

# The held-out test phantoms of config/train_demo_stage6.toml (seeds 3 and 5; generated if missing) and of
# stage 7 (seed 16, with implants), the real hip CT, the implant pairs (seed 18),
# pooled, the targets, and the one-leg-atrophied side check.
evaluate-demo: install
	$(BIN)/thighnode evaluate --bundle bundles/thighnode_demo --data /tmp/thighnode_data_v3/test /tmp/thighnode_data_v3/test5 \
		--generate-from config/train_demo_stage6.toml --side-check --real
	$(BIN)/thighnode evaluate --bundle bundles/thighnode_demo --data /tmp/thighnode_data_v3/test_imp16 \
		--generate-from config/train_demo_stage7.toml
	$(BIN)/thighnode evaluate-implants --bundle bundles/thighnode_demo

demo: install
	$(BIN)/python deploy/demo.py

clean:
	rm -rf $(VENV) .pytest_cache
