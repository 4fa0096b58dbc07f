# Two entry points: `make demo` and `make test`. Both create .venv and install sonocad first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test clean chromium

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
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

test: install chromium
	$(BIN)/lint-imports --no-cache
	$(BIN)/python -m pytest -q

clean:
	rm -rf runs/demo demo_data
