# cryo-drvae: every target builds what it needs; nothing is installed by hand.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
# TORCH=cpu (default): torch==$(TORCH_VERSION) as the machine's package index resolves it (a CPU wheel
# here, from local disk). TORCH=cuda: the CUDA build from the index given as TORCH_INDEX (PyTorch's
# wheel index for your CUDA tag), or PyPI's default Linux build when TORCH_INDEX is empty.
# The flavour a .venv was built with is remembered (.venv/.torch), so later targets keep it.
TORCH ?= $(shell cat $(VENV)/.torch 2>/dev/null || echo cpu)
TORCH_INDEX ?=
STAMP  := $(VENV)/.installed-$(TORCH)
TORCH_PIP := torch==$(TORCH_VERSION) $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
DEMO_DIR ?= demo_out
# the demo projects a real protein (3KPR) when the shared atomic models are beside the repo, else blobs
DEMO_PDB := $(wildcard ../shared/data/structures/3KPR.cif.gz)
DEMO_MODEL := $(if $(DEMO_PDB),--pdb $(DEMO_PDB) --angpix 0)
JOBS ?= 2

.PHONY: install install-relion demo test test-fast bench bench-quick bench-scale reliability clean

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# the pinned torch first (CPU unless TORCH=...), so that install_requires does not pull another build
	if [ -f $(VENV)/.torch ] && [ "$$(cat $(VENV)/.torch)" != "$(TORCH)" ]; then $(PY) -m pip uninstall -y -q torch; fi
	$(PY) -m pip install -q $(TORCH_PIP)
	$(PY) -m pip install -q -e '.[test]'
	echo $(TORCH) > $(VENV)/.torch
	touch $(STAMP)

install: $(STAMP)

install-relion:
	bash scripts/install_relion.sh

demo: $(STAMP)
	$(VENV)/bin/cryo-drvae simulate --o $(DEMO_DIR)/sim --K 10 --n 1000 --snr 0.05 --seed 1 $(DEMO_MODEL)
	$(VENV)/bin/cryo-drvae classify --i $(DEMO_DIR)/sim/particles.star --o $(DEMO_DIR)/Class2D/run --K 10 --j $(JOBS) --overwrite
	$(VENV)/bin/cryo-drvae evaluate --truth $(DEMO_DIR)/sim/truth.csv --data $(DEMO_DIR)/Class2D/run_data.star
	@echo "pictures: $(DEMO_DIR)/Class2D/run_classes.png $(DEMO_DIR)/Class2D/run_convergence.png"

test: $(STAMP) install-relion
	$(PY) -m pytest -q tests

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not relion and not slow" tests

bench: $(STAMP) install-relion
	$(PY) bench/run_bench.py --sets all --j $(JOBS)
	$(PY) bench/junk_bench.py --j $(JOBS)

bench-quick: $(STAMP) install-relion
	$(PY) bench/run_bench.py --sets easy --j $(JOBS)

# GPU=0 runs the scaling benchmark on GPU 0; SIZES=2000,20000 for a shorter run
SIZES ?= 2000,20000,200000
bench-scale: $(STAMP)
	$(PY) bench/bench_scale.py --sizes $(SIZES) --j $(JOBS) $(if $(GPU),--gpu $(GPU))

# bad inputs and faults (full disks, unnormalised stacks, --continue, locks, SIGTERM) -> a table;
# SMALL_FS=<empty folder on a ~96 kB tmpfs> adds two real full-disk cases
reliability: $(STAMP)
	$(PY) scripts/reliability_matrix.py $(if $(SMALL_FS),--small-fs $(SMALL_FS))

clean:
	rm -rf $(VENV) $(DEMO_DIR) .pytest_cache
