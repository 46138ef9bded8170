# Two commands, each doing its own set-up: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PIP := $(VENV)/bin/python -m pip
# Without a usable NVIDIA GPU we install torch's CPU build: never a multi-GB CUDA build in CI.
TORCH_CPU ?= torch==2.13.0
# The exact versions CI tested (README, "Reproducible test runs"); `make refresh-constraints`
# resolves the newest ones, writes them here and runs the suite on them.
CONSTRAINTS ?= requirements/test.txt
HAS_GPU := nvidia-smi -L >/dev/null 2>&1
# pytest's own script, never `python -m pytest`: that puts the repository root first on sys.path,
# where kernels/ shadows Hugging Face's `kernels` (README, "Why the repository root is not on sys.path").
PYTEST := $(VENV)/bin/pytest

.PHONY: demo test bench venv clean refresh-constraints

$(VENV)/.torch: $(CONSTRAINTS)
	rm -rf $(VENV)
	$(PYTHON) -m venv $(VENV)
	# With a GPU, triton is the one torch's CUDA build pins, whatever CI's CPU machine resolved.
	if $(HAS_GPU); then grep -v '^triton==' $(or $(CONSTRAINTS),/dev/null); else cat $(or $(CONSTRAINTS),/dev/null); fi \
	  > $(VENV)/constraints.txt
	$(PIP) install -q -c $(VENV)/constraints.txt setuptools wheel
	if $(HAS_GPU); then $(PIP) install -q -c $(VENV)/constraints.txt torch; \
	  else $(PIP) install -q -c $(VENV)/constraints.txt $(TORCH_CPU); fi
	touch $@

# --no-build-isolation: setup.py builds the CUDA extension against the torch installed above.
$(VENV)/.installed: $(VENV)/.torch pyproject.toml setup.py $(wildcard csrc/*)
	$(PIP) install -q -c $(VENV)/constraints.txt --no-build-isolation -e '.[test]'
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(VENV)/bin/pixtral-fast demo

test: venv
	$(PYTEST) tests -q -n 2 --dist loadfile  # both cores: the interpreter and AOT compiles are single-threaded
	$(PYTEST) bench -q --benchmark-only -m "not gpu"

bench: venv
	$(PYTEST) bench --benchmark-only

# A new venv from the newest releases that pyproject.toml admits, its versions frozen into
# $(CONSTRAINTS), then the whole suite on them. Run it to move to new releases on purpose;
# commit the file only when the suite passes.
refresh-constraints:
	rm -rf $(VENV)
	$(MAKE) venv CONSTRAINTS=
	{ echo "# make test installs exactly these (pip -c). Made by make refresh-constraints on $$(date -u +%F)"; \
	  $(PIP) freeze --all --exclude-editable | grep -v '^pip==' | sed -E 's/\+[a-z0-9.]+$$//'; } > $(CONSTRAINTS).new
	mv $(CONSTRAINTS).new $(CONSTRAINTS)
	touch $(VENV)/.torch $(VENV)/.installed
	$(MAKE) test

clean:
	rm -rf $(VENV) build *.egg-info pixtral_fast/_C*.so .cache
