# Two commands, each doing its own set-up: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PIP := $(VENV)/bin/python -m pip
# Without a usable NVIDIA GPU we install torch's CPU build: never a multi-GB CUDA build in CI.
TORCH_CPU ?= torch==2.13.0

.PHONY: demo test bench venv clean

$(VENV)/.torch:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q setuptools wheel
	if nvidia-smi -L >/dev/null 2>&1; then $(PIP) install -q torch; else $(PIP) install -q $(TORCH_CPU); fi
	touch $@

# --no-build-isolation: setup.py builds the CUDA extension against the torch installed above.
$(VENV)/.installed: $(VENV)/.torch pyproject.toml setup.py $(wildcard csrc/*)
	$(PIP) install -q --no-build-isolation -e '.[test]'
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(VENV)/bin/pixtral-fast demo

test: venv
	$(VENV)/bin/python -m pytest tests -q -n 2 --dist loadfile  # both cores: the interpreter and AOT compiles are single-threaded
	$(VENV)/bin/python -m pytest bench -q --benchmark-only -m "not gpu"

bench: venv
	$(VENV)/bin/python -m pytest bench --benchmark-only

clean:
	rm -rf $(VENV) build *.egg-info pixtral_fast/_C*.so .cache
