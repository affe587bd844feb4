# PruneScope: `make run` starts the app, `make test` runs the whole suite. Both set up .venv first.
PY      ?= python3
VENV    := .venv
VPY     := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
# The project itself, installed editable into .venv (pyproject.toml): the `prunescope` command.
EDITABLE := $(VENV)/.editable
# The NCS2 (MYRIAD) compiler environment: Python <= 3.9 + openvino 2021.4.2 (scripts/setup-myriad.sh).
# Its status.json says whether it works; without a Python <= 3.9 the set-up says so once and goes on.
MYRIAD  := .venv-myriad/status.json
PORT    ?= 8501

.PHONY: run test bench setup myriad clean-venv clean-myriad

setup: $(STAMP) $(EDITABLE) $(MYRIAD)

myriad: $(MYRIAD)

$(MYRIAD): scripts/setup-myriad.sh core/myriad_shim.cpp core/myriad_worker.py
	bash scripts/setup-myriad.sh

# Re-installs only when requirements.txt changes; the stamp marks a complete install.
$(STAMP): requirements.txt
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install --quiet --upgrade pip
	$(VPY) -m pip install --quiet -r requirements.txt
	touch $(STAMP)

# PruneScope into .venv, editable: `core`/`ui` importable from anywhere and `.venv/bin/prunescope` (= python -m core).
# --no-deps: never touches the pins above (torch); --no-build-isolation: builds offline with the venv's own
# setuptools (torch itself requires setuptools>=77). Its own stamp, so an existing .venv gets it too.
$(EDITABLE): $(STAMP) pyproject.toml
	$(VPY) -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $(EDITABLE)

run: $(STAMP) $(EDITABLE) $(MYRIAD)
	$(VPY) -m streamlit run streamlit_app.py --server.address 127.0.0.1 --server.port $(PORT) --server.headless true

test: $(STAMP) $(EDITABLE) $(MYRIAD)
	$(VPY) -m pytest

bench: $(STAMP)
	$(VPY) bench/car_speed.py
	$(VPY) bench/criteria.py
	$(VPY) bench/prune_result.py
	$(VPY) bench/latency.py
	$(VPY) bench/ray_car.py

clean-venv:
	rm -rf $(VENV)

clean-myriad:
	rm -rf .venv-myriad
