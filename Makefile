# Every target creates .venv itself when missing; a fresh clone needs only python3.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export OMP_NUM_THREADS ?= 1
export HF_HUB_OFFLINE := 1
export TORCHINDUCTOR_CACHE_DIR ?= $(CURDIR)/.cache/inductor

.PHONY: venv test conformance families docs stacks bench bench-smoke gpu-check lint format clean

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PYTHON) tools/install.py $(BIN)/python -c constraints.txt -e '.[test,docs]'
	touch $(STAMP)

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: venv lint
	$(BIN)/python -m pytest -q -n 2 --dist loadgroup tests

conformance: venv
	$(BIN)/python -m pytest -q --pyargs pytest_hotswap.conformance \
		--hotswap-backend=inductor --hotswap-max-rank=128 $(ARGS)

# The conformance suite on every built-in pipeline family (eager backend), ending with the
# family-by-scenario matrix; `make conformance` stays the main job.
FAMILIES := sd,sdxl,sd3,flux,wan,qwenimage,chroma,zimage
families: venv
	$(BIN)/python -m pytest -q --pyargs pytest_hotswap.conformance \
		--hotswap-pipelines=$(FAMILIES) --hotswap-backend=eager $(ARGS)

# The pages under docs/ (mkdocs.yml), strict: a broken link, anchor or a page left out of the nav
# fails the build. Output in site/ (ignored).
docs: venv
	$(BIN)/python -m mkdocs build --strict --site-dir site

# The conformance suite on the oldest supported, the pinned and the newest stacks (nox, one
# virtualenv each, uv when available), then one table: what changes if we upgrade. TORCH=2.14.1
# adds a torch axis (a CUDA build of several GB: not run in CI).
stacks: venv
	$(BIN)/python -m pip install --quiet 'nox>=2024.4' 'uv>=0.5'
	TORCH=$(or $(TORCH),2.13.0) $(BIN)/nox -f noxfile.py $(ARGS)

bench: venv
	$(BIN)/python -m pytest_hotswap.bench --out bench-results $(ARGS)

bench-smoke: venv
	$(BIN)/python -m pytest_hotswap.bench --smoke --out bench-results/smoke $(ARGS)

# One prepared script for a machine with one CUDA GPU and no network: the bench in GPU mode
# (bf16, inductor max-autotune-no-cudagraphs and reduce-overhead) and the conformance suite on
# cuda, everything under bench-results/gpu, < 8 minutes; fails loudly (exit 2) without a GPU.
gpu-check: venv
	$(BIN)/python -m pytest_hotswap.bench --gpu-check --out bench-results/gpu

format: venv
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) .cache .pytest_cache .nox reports bench-results site
