# Every target sets up the project-local environment first (idempotent, seconds when done).
VENV ?= .venv
PY := $(VENV)/bin/python
export MMVIT_VENV := $(abspath $(VENV))

.PHONY: env test demo demo-det lint clean-env

env:
	@bash tools/setup_env.sh

# The environment has the deploy extra: its tests must run, not skip.
test: env
	MMVIT_REQUIRE_DEPLOY=1 $(PY) -m pytest

demo: env
	$(PY) tools/misc/demo.py --task seg

demo-det: env
	$(PY) tools/misc/demo.py --task det

lint: env
	$(VENV)/bin/ruff check mmvit_plugins tools tests configs

clean-env:
	rm -rf $(VENV)
