# Two entry points: `make demo` and `make test`. Both create .venv and install sonocad first, with every extra,
# at the exact versions tested (requirements/lock.txt; pyproject.toml itself declares compatible ranges).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
LOCK := requirements/lock.txt

.PHONY: install demo test clean chromium lock gpu-check gpu-check-data

$(STAMP): pyproject.toml $(LOCK)
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c $(LOCK) -e '.[all,test]'
	touch $(STAMP)

install: $(STAMP)

# Synthetic B-mode phantoms, then the full pipeline: train (two phases), evaluate, report.
demo: install
	test -d demo_data || $(BIN)/sonocad synth demo_data --n 240 --seed 0
	$(BIN)/sonocad train demo_data --out runs/demo --img-size 128 --appearance standard --seed 0 --overwrite
	$(BIN)/sonocad predict runs/demo "demo_data/malignant/malignant (1).png" "demo_data/benign/benign (1).png"

# The browser test drives Debian's chromium (never a browser Playwright downloads): installed here when missing
# and running as root; otherwise one line says how, and that test is skipped with its reason.
chromium:
	@command -v chromium >/dev/null 2>&1 || { if [ "$$(id -u)" = 0 ]; then \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
	  || echo "could not install chromium; the browser test will be skipped"; \
	else echo "the browser test needs Debian's chromium: sudo apt-get install chromium"; fi; }

# Two workers, one file each at a time (a file's fixtures are built once), one thread each (tests/conftest.py).
test: install chromium
	$(BIN)/lint-imports --no-cache
	$(BIN)/python -m pytest -q -n 2 --dist loadfile

# The GPU path (scripts/gpu_check.py): gpu-check-data here (60 BUSI images at most 256 px and the Lite0 weights,
# about 21 MB, git-ignored), then gpu-check on the GPU machine with gpu-check-data carried. It runs from the source
# tree with the machine's own Python and torch (no .venv there, no package index); without CUDA, on the CPU.
GPU_PY ?= $(shell test -x $(BIN)/python && echo $(BIN)/python || echo python3)
gpu-check-data:
	$(BIN)/python scripts/gpu_check.py --prepare ../shared/data/busi/Dataset_BUSI_with_GT gpu-check-data

gpu-check:
	PYTHONPATH=src $(GPU_PY) scripts/gpu_check.py --out gpu-check-out

# The lock after a tested change of versions: what .venv holds now, sonocad itself left out.
lock: install
	{ head -n 2 $(LOCK); $(BIN)/pip freeze --exclude-editable; } > $(LOCK).new && mv $(LOCK).new $(LOCK)

clean:
	rm -rf runs/demo demo_data gpu-check-out
