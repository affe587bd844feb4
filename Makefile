# PruneScope: `make run` starts the app, `make test` runs the whole suite. Both set up .venv first.
PY      ?= python3
VENV    := .venv
VPY     := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
PORT    ?= 8501

.PHONY: run test bench setup clean-venv

setup: $(STAMP)

# Re-installs only when requirements.txt changes; the stamp marks a complete install.
$(STAMP): requirements.txt
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install --quiet --upgrade pip
	$(VPY) -m pip install --quiet -r requirements.txt
	touch $(STAMP)

run: $(STAMP)
	$(VPY) -m streamlit run streamlit_app.py --server.address 127.0.0.1 --server.port $(PORT) --server.headless true

test: $(STAMP)
	$(VPY) -m pytest

bench: $(STAMP)
	$(VPY) bench/car_speed.py
	$(VPY) bench/criteria.py
	$(VPY) bench/prune_result.py
	$(VPY) bench/latency.py

clean-venv:
	rm -rf $(VENV)
