# Every target sets up the project-local environment first (idempotent, seconds when done).
VENV ?= .venv
PY := $(VENV)/bin/python
export MMVIT_VENV := $(abspath $(VENV))

.PHONY: env test demo demo-det lint gpu-check clean-env

env:
	@bash tools/setup_env.sh

# The environment has the deploy extra: its tests must run, not skip. The 30 slowest tests are
# listed at the end, so that every run's log shows where the suite's time goes.
test: env
	MMVIT_REQUIRE_DEPLOY=1 $(PY) -m pytest --durations=30

demo: env
	$(PY) tools/misc/demo.py --task seg

demo-det: env
	$(PY) tools/misc/demo.py --task det

lint: env
	$(VENV)/bin/ruff check mmvit_plugins tools tests configs

# On a GPU machine: the device-parametrised tests and the GPU benchmark table, within 8 minutes;
# results in work_dirs/gpu_check/
gpu-check: env
	$(PY) tools/analysis/gpu_check.py --device cuda --out-dir work_dirs/gpu_check

clean-env:
	rm -rf $(VENV)
