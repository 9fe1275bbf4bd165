# scn: `make run` trains the default job, `make test` runs lint and the tests.
# Everything lives in .venv/ inside the repository; `make install` creates it.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# Pinned here (not in pyproject.toml, which keeps ranges so users can bring their own CUDA build).
TORCH := torch==2.14.1 torchvision==0.29.1
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz

# CIFAR-10 for bench-cifar10: `make bench-cifar10 CIFAR10=DIR` (an ImageFolder tree or torchvision's copy).
CIFAR10 ?=

.PHONY: install data run test lint bench bench-format bench-removal bench-cifar10 bench-pareto bench-step bench-paper-regime figures clean

install: $(VENV)/.installed data

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

# Fashion-MNIST from Debian's package, when neither it nor ./data has a copy.
data:
	@if [ ! -f $(FMNIST) ] && [ ! -d data/FashionMNIST ]; then \
		echo "Installing Fashion-MNIST (dataset-fashion-mnist)"; \
		$(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q dataset-fashion-mnist \
		|| echo "warning: could not install dataset-fashion-mnist; scn-train will try torchvision's download"; \
	fi

run: install
	$(VENV)/bin/scn-train +experiment=fashion_mnist_cnn

test: install lint
	$(PY) -m pytest

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check scn tests scripts experiments

# Benchmarks write docs/results/; finished runs under outputs/bench/ are reused (resumable).
bench: install
	$(PY) scripts/bench_fashion_mnist.py

bench-format: bench
	$(PY) scripts/bench_format.py

bench-removal: install
	$(PY) scripts/bench_removal.py --seeds 0 1

bench-cifar10: install
	@[ -n "$(CIFAR10)" ] || { echo 'make bench-cifar10 needs CIFAR10=DIR (the CIFAR-10 folder)'; exit 2; }
	$(PY) scripts/bench_cifar10.py dataset.root=$(CIFAR10)

bench-pareto: install
	$(PY) scripts/bench_pareto.py

bench-step: install
	$(PY) scripts/bench_step.py --rounds 25

bench-paper-regime: install
	$(PY) scripts/bench_paper_regime.py

figures: install
	$(PY) scripts/paper_figures.py

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .ruff_cache
