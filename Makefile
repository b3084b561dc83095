# Two commands do everything on a fresh machine with Python 3.11:
#   make demo   - install the locked environment and run the quickstart simulation
#   make test   - install the locked environment and run the whole test suite
# uv comes from PATH, or is installed once into .tools/ (a private venv, so system Python
# installations marked "externally managed" are left alone).

UV_VERSION := 0.13.9
UV := $(shell command -v uv 2>/dev/null || echo .tools/bin/uv)
# Three pytest-xdist workers on the 2-core CI machines: the end-to-end tests spend part of their
# time waiting on their processes (Flower's polling), and a third worker fills it. A module whose
# tests share an expensive fixture is kept on one worker (xdist_group marks, --dist loadgroup).
PYTEST_ARGS ?= -n 3 --dist loadgroup --durations=25

.PHONY: demo test test-fast test-compose bench bench-secagg bench-dp-step bench-flower bench-scale bench-all bench-audit bench-user-dp bench-user-dp-preset generated sync clean

.tools/bin/uv:
	python3 -m venv .tools
	.tools/bin/python -m pip install --quiet "uv==$(UV_VERSION)"

sync: $(if $(filter .tools/bin/uv,$(UV)),.tools/bin/uv)
	$(UV) sync --locked --python 3.11

demo: sync
	$(UV) run --locked fedpriv simulate

test: sync
	$(UV) run --locked pytest $(PYTEST_ARGS)

test-fast: sync
	$(UV) run --locked pytest -m "not slow" $(PYTEST_ARGS)

# docker-compose.yml started for real (needs Docker Engine and Compose v2; not part of make test):
# see deploy/test-compose.sh and docs/deployment.md.
test-compose: sync
	bash deploy/test-compose.sh

bench: sync
	$(UV) run --locked python benchmarks/dp_vs_nodp.py

bench-secagg: sync
	$(UV) run --locked python benchmarks/secagg.py

bench-dp-step: sync
	$(UV) run --locked python benchmarks/dp_step.py

bench-audit: sync
	$(UV) run --locked python benchmarks/empirical_audit.py

bench-user-dp: sync
	$(UV) run --locked python benchmarks/user_dp_curve.py

bench-user-dp-preset: sync
	$(UV) run --locked python benchmarks/user_dp_curve.py --as-shipped 3 --no-dp-runs 1

bench-flower: sync
	$(UV) run --locked python benchmarks/flower_baseline.py

bench-scale: sync
	$(UV) run --locked python benchmarks/scale.py

bench-all: sync
	$(UV) run --locked python benchmarks/run_all.py

generated: sync
	$(UV) run --locked python docs/generate.py

clean:
	rm -rf .tools .venv runs .pytest_cache
