# Two commands: `make demo` (whole workflow on the embedded synthetic collection) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test benchmark zoo install clean

$(PY):
	python3.11 -m venv $(VENV) || python3 -m venv $(VENV)

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	PATH=$(abspath $(VENV))/bin:$$PATH $(VENV)/bin/snakemake --cores all --configfile config.yaml

# One command per benchmark grid: make benchmark CONFIG=configs/benchmark-ahawp.yaml
benchmark: $(STAMP)
	@test -n "$(CONFIG)" || { echo "usage: make benchmark CONFIG=configs/benchmark-<name>.yaml"; exit 2; }
	PATH=$(abspath $(VENV))/bin:$$PATH $(VENV)/bin/snakemake --cores all --configfile $(CONFIG)

# Retrain the shipped checkpoints (zoo/) with the CPU recipes of configs/zoo.yaml and score their
# learning curves (bench/ssl_curve.py; about 70 core-minutes of training plus scoring).
zoo: $(STAMP)
	PATH=$(abspath $(VENV))/bin:$$PATH $(PY) bench/ssl_curve.py --threads 1

test: $(STAMP)
	PATH=$(abspath $(VENV))/bin:$$PATH $(PY) -m pytest

clean:
	rm -rf results .snakemake
