# PruneScope: `make run` starts the app, `make test` runs the whole suite. Both set up .venv first.
PY      ?= python3
VENV    := .venv
VPY     := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
# The NCS2 (MYRIAD) compiler environment: Python <= 3.9 + openvino 2021.4.2 (scripts/setup-myriad.sh).
# Its status.json says whether it works; without a Python <= 3.9 the set-up says so once and goes on.
MYRIAD  := .venv-myriad/status.json
PORT    ?= 8501

.PHONY: run test bench setup myriad clean-venv clean-myriad

setup: $(STAMP) $(MYRIAD)

myriad: $(MYRIAD)

$(MYRIAD): scripts/setup-myriad.sh core/myriad_shim.cpp core/myriad_worker.py
	bash scripts/setup-myriad.sh

# Re-installs only when requirements.txt changes; the stamp marks a complete install.
$(STAMP): requirements.txt
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install --quiet --upgrade pip
	$(VPY) -m pip install --quiet -r requirements.txt
	touch $(STAMP)

run: $(STAMP) $(MYRIAD)
	$(VPY) -m streamlit run streamlit_app.py --server.address 127.0.0.1 --server.port $(PORT) --server.headless true

test: $(STAMP) $(MYRIAD)
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
