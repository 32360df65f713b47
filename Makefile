# cryo-drvae: every target builds what it needs; nothing is installed by hand.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
TORCH_VERSION ?= 2.13.0
DEMO_DIR ?= demo_out

.PHONY: install demo test bench bench-quick bench-scale install-relion clean

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# the pinned CPU torch first, so nothing pulls a multi-GB CUDA build
	$(PY) -m pip install -q torch==$(TORCH_VERSION)
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/cryo-drvae simulate --o $(DEMO_DIR)/sim --K 10 --n 1000 --snr 0.05 --seed 1
	$(VENV)/bin/cryo-drvae classify --i $(DEMO_DIR)/sim/particles.star --o $(DEMO_DIR)/Class2D/run --K 10 --j 2
	$(VENV)/bin/cryo-drvae evaluate --truth $(DEMO_DIR)/sim/truth.csv --data $(DEMO_DIR)/Class2D/run_data.star
	@echo "class averages picture: $(DEMO_DIR)/Class2D/run_classes.png"

test: $(STAMP)
	$(PY) -m pytest -q tests

clean:
	rm -rf $(VENV) $(DEMO_DIR) .pytest_cache
