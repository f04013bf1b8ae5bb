# Two commands do all the set-up on a fresh machine:
#   make sweep   create .venv, install, run the quick ablation sweep and write its report
#   make test    create .venv, install, run the test suite
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
ARGS   ?=

.PHONY: sweep test install clean

$(VENV)/.installed: pyproject.toml docker/constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# the CPU build of torch first: a looser requirement can pull a multi-GB CUDA build
	$(PY) -m pip install --quiet torch==2.13.0
	# the rest pinned to the versions the images use (docker/constraints.txt)
	$(PY) -m pip install --quiet -e '.[dev]' -c docker/constraints.txt
	touch $@

install: $(VENV)/.installed

sweep: $(VENV)/.installed
	$(PY) sweeps/ablation.py $(ARGS)

test: $(VENV)/.installed
	$(PY) -m pytest tests $(ARGS)

clean:
	rm -rf $(VENV) .regablate mlflow.db mlartifacts ray_results reports
