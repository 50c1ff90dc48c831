# Every target creates .venv itself when missing; a fresh clone needs only python3.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export OMP_NUM_THREADS ?= 1
export HF_HUB_OFFLINE := 1
export TORCHINDUCTOR_CACHE_DIR ?= $(CURDIR)/.cache/inductor

.PHONY: venv test test-slow conformance families wheel-check docs stacks bench bench-smoke gpu-check gpu-bundle gpu-check-dry lint ci-lint format clean

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PYTHON) tools/install.py $(BIN)/python -c constraints.txt -e '.[test,docs]'
	touch $(STAMP)

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# The GitHub workflows (ours and the downstream example's) against GitHub's schema, and zizmor's
# offline audits (pinned actions, no persisted credentials, ...): no network, no token.
ci-lint: venv
	$(BIN)/check-jsonschema --builtin-schema vendor.github-workflows .github/workflows/*.yml examples/downstream/ci/*.yml
	$(BIN)/zizmor --offline .github/workflows examples/downstream/ci/*.yml

# The project's own tests in two tiers: `make test` (unit and in-process integration, minutes) and
# `make test-slow` (end-to-end pytest sessions that build and compile pipelines, the bench smoke,
# order independence). CI runs both.
test: venv lint ci-lint
	$(BIN)/python -m pytest -q -n 2 --dist loadgroup -m "not slow" tests

test-slow: venv
	$(BIN)/python -m pytest -q -n 2 --dist loadgroup -m slow tests

# One xdist worker per core; --dist loadgroup keeps each column (pipeline x implementation) on
# one worker, so its scenarios share the pipelines that worker compiled.
# Its report (with the time split `make bench` reads: conformance_split) goes to CONFORMANCE_REPORT.
CONFORMANCE_REPORT ?= bench-results/conformance.json
conformance: venv
	$(BIN)/python -m pytest -q -n auto --dist loadgroup --no-loadscope-reorder \
		--pyargs pytest_hotswap.conformance \
		--hotswap-backend=inductor --hotswap-max-rank=128 \
		--hotswap-report=$(CONFORMANCE_REPORT) $(ARGS)

# The conformance suite on every built-in pipeline family (eager backend), ending with the
# family-by-scenario matrix; `make conformance` stays the main job. Each family is saved with
# save_pretrained (tokenizers included) into .cache/families/<name> (reused when complete) and
# run as a user runs a saved pipeline: by absolute path, from another directory (a fresh temporary
# one), so the columns are the folders' names.
FAMILIES := sd,sdxl,sd3,flux,wan,qwenimage,chroma,zimage
FAMILIES_DIR := $(CURDIR)/.cache/families
families: venv
	@folders=$$($(BIN)/python -m pytest_hotswap.pipelines.families save $(FAMILIES_DIR) \
		$(FAMILIES)) || exit 1; \
	elsewhere=$$(mktemp -d) && cd $$elsewhere && echo "make families: running in $$elsewhere" && \
	$(CURDIR)/$(BIN)/python -m pytest -q -p no:cacheprovider -n auto --dist loadgroup \
		--pyargs pytest_hotswap.conformance \
		--hotswap-pipelines=$$folders --hotswap-backend=eager $(ARGS); \
	status=$$?; cd / && rm -rf $$elsewhere; exit $$status

# The README's "in your repository" path from the built wheel: a fresh virtualenv in a temporary
# folder, the wheel without extras plus the pinned stack, the conformance suite (eager) run from a
# folder outside the repository; fails unless it exits 0 with the quantized base "not supported".
wheel-check:
	$(PYTHON) tools/wheel_check.py $(ARGS)

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

# One prepared script for a machine with CUDA GPUs and no network: the bench in GPU mode
# (bf16, inductor max-autotune-no-cudagraphs and reduce-overhead) on the first GPU and the
# conformance suite on cuda (one xdist worker per GPU where torch sees several; tests and seconds
# per device), everything under bench-results/gpu, < 8 minutes; fails loudly (exit 2) without a GPU.
#
# A GPU machine without network (docs/gpu.md): `make gpu-bundle` here writes gpu-bundle/ (the
# project's wheel and the wheels that machine lacks, never torch, <= 64 MiB, manifest.json); there
# `make gpu-check PYTHON=python3 NO_VENV=1` uses that python and its torch, installs the bundle
# with pip --no-index --target $(GPU_SITE), checks what it imports against the manifest, then runs
# the check into $(GPU_OUT).
GPU_BUNDLE ?= gpu-bundle
GPU_OUT ?= bench-results/gpu
GPU_SITE ?= .cache/gpu-site
# The dry run's machine: a virtualenv holding torch 2.11.0 and the GPU image's other packages.
GPU_DRY_VENV ?= .cache/gpu-dry-venv
GPU_DRY_IMAGE := torch==2.11.0 transformers==5.17.0 huggingface_hub==1.33.0 safetensors==0.8.0 \
	accelerate==1.15.0 pytest==9.2.0 pytest-xdist==3.8.0 pillow regex requests pyyaml psutil tqdm \
	matplotlib

ifdef NO_VENV
gpu-check:
	$(PYTHON) -m pytest_hotswap.bench.bundle check --bundle $(GPU_BUNDLE) --target $(GPU_SITE) \
		--out $(GPU_OUT) $(if $(DRY),--dry)
else
gpu-check: venv
	$(BIN)/python -m pytest_hotswap.bench --gpu-check --out $(GPU_OUT)
endif

gpu-bundle: venv
	$(BIN)/python -m pytest_hotswap.bench.bundle build --out $(GPU_BUNDLE)

# The bundle on torch 2.11.0 without a GPU, as the GPU image would take it: imports, manifest,
# the no-GPU exit, the GPU conformance options collected (for one GPU and for two: -n 2), a few
# eager scenarios. Not in CI (torch 2.11.0 is a CUDA build of several GB); bench-results/gpu-dry.
gpu-check-dry: gpu-bundle
	test -x $(GPU_DRY_VENV)/bin/python || $(PYTHON) -m venv $(GPU_DRY_VENV)
	PIP_CONSTRAINT= $(GPU_DRY_VENV)/bin/python -m pip install --quiet $(GPU_DRY_IMAGE)
	$(MAKE) gpu-check NO_VENV=1 PYTHON=$(GPU_DRY_VENV)/bin/python GPU_OUT=bench-results/gpu-dry \
		GPU_SITE=.cache/gpu-dry-site DRY=1

format: venv
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) .cache .pytest_cache .nox reports bench-results site gpu-bundle
