# The two commands of the README: `make demo` runs the product on embedded defaults,
# `make test` installs what the tests need and passes them.
SHELL := /bin/bash
PACKAGES := features training serving sharefeed
DEMO_DIR ?= .demo
DEMO_PORT ?= 8000
UV := $(shell command -v uv 2>/dev/null || echo "python3 -m uv")

.PHONY: setup demo demo-data demo-train test lint typecheck imports unit benchmarks clean

setup:  ## the locked environment (installs uv itself when missing)
	@command -v uv >/dev/null 2>&1 || python3 -m uv --version >/dev/null 2>&1 || python3 -m pip install --quiet uv
	$(UV) sync --frozen

demo-data: setup
	$(UV) run sharefeed demo-data --out $(DEMO_DIR)/data --users 5000 --items 2000 --days 60

demo-train: demo-data
	$(UV) run sharefeed train --data $(DEMO_DIR)/data --out $(DEMO_DIR)/bundle

demo: demo-train  ## demo data -> train -> serve on http://127.0.0.1:$(DEMO_PORT)
	@SHAREFEED_KEYS_FILE=$(DEMO_DIR)/keys.json $(UV) run sharefeed keys create --scope admin --name demo \
		2>/dev/null | tail -1 > $(DEMO_DIR)/demo-key.txt
	@echo "API key (admin scope; also in $(DEMO_DIR)/demo-key.txt): $$(cat $(DEMO_DIR)/demo-key.txt)"
	@echo "serving on http://127.0.0.1:$(DEMO_PORT); try:"
	@echo "  KEY=$$(cat $(DEMO_DIR)/demo-key.txt)"
	@echo "  curl -H \"Authorization: Bearer \$$KEY\" 'http://127.0.0.1:$(DEMO_PORT)/v1/users/u000001/feed?n=5&explain=true'"
	@echo "  curl -X POST http://127.0.0.1:$(DEMO_PORT)/v1/events -H \"Authorization: Bearer \$$KEY\" -H 'content-type: application/json' \\"
	@echo "       -d '{\"events\": [{\"user_id\": \"u000001\", \"item_id\": \"p00001\", \"event_type\": \"view\", \"timestamp\": \"'$$(date -u +%FT%TZ)'\"}]}'"
	@echo "  (events are logged into $(DEMO_DIR)/data/events/, so 'sharefeed train --data $(DEMO_DIR)/data' learns from them)"
	@echo "  a share reaches its recipient's next feed (source \"shared\"): the same POST with"
	@echo "       '{\"events\": [{\"user_id\": \"u000002\", \"item_id\": \"p00007\", \"event_type\": \"share\", \"target_user_id\": \"u000001\", \"timestamp\": \"...\"}]}'"
	SHAREFEED_EVENT_LOG=$(DEMO_DIR)/data SHAREFEED_KEYS_FILE=$(DEMO_DIR)/keys.json \
		$(UV) run sharefeed serve --bundle $(DEMO_DIR)/bundle --port $(DEMO_PORT)

lint: setup
	$(UV) run ruff check $(PACKAGES) tests benchmarks

typecheck: setup
	$(UV) run mypy

imports: setup
	$(UV) run lint-imports

unit: setup
	$(UV) run pytest -q

test: lint typecheck imports unit

benchmarks: setup
	$(UV) run python benchmarks/train_cost.py

clean:
	rm -rf $(DEMO_DIR) .pytest_cache .mypy_cache .ruff_cache
