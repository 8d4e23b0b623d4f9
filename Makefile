# engine-factory developer entry points. `make demo` and `make test` work on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# CPU machines take the local CPU build of torch; on a GPU machine set TORCH= to keep your CUDA build.
TORCH  ?= torch==2.13.0
# `make test` with the CPU torch adds triton: its interpreter (TRITON_INTERPRET=1) runs the GPU kernels' tests
# on the CPU against the torch reference. With TORCH= (a GPU machine) the triton that came with your torch stays.
TRITON ?= $(if $(TORCH),triton==3.9.0)
STORE  ?= $(CURDIR)/.store
export EF_STORE := $(STORE)

.PHONY: install mpi demo test test-cuda bench engines reproduce clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(if $(TORCH),$(PY) -m pip install -q "$(TORCH)")
	@$(MAKE) -s mpi
	$(PY) -m pip install -q -e '.[test,launchers]'
	$(PY) -m pip install -q -e '.[mpi]' || echo "make install: mpi4py did not install; the mpirun tests will skip"
	touch $@

# Open MPI for the multi-rank tests (mpirun): from Debian's packages when it is absent and we are root.
mpi:
	@if command -v mpirun >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "make install: installing Open MPI from Debian's packages (openmpi-bin) for the multi-rank tests"; \
	  { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
	      openmpi-bin libopenmpi-dev; } >/dev/null 2>&1 \
	    || echo "make install: apt-get could not install Open MPI; the mpirun tests will skip"; \
	else echo "make install: no mpirun, and no apt-get as root to install it: the mpirun tests will skip"; fi

# The main job on the built-in default: SmolLM2-135M-Instruct (GGUF from PyPI) -> fp16 engine -> generate.
demo: install
	@engine=$$($(PY) -m engine_factory recipe=smollm2_135m_fp16 | tail -n 1 | sed 's/^engine: //') && \
	  test -d "$$engine" && echo "engine: $$engine" && \
	  $(PY) -m runtime.run --engine_dir "$$engine" --input_text "The capital of France is" --max_output_len 24

# `make reproduce`, then the test suite (CI runs this through .ci/run). Tests marked cuda skip without a GPU.
# TEST_WORKERS pytest-xdist workers, each taking whole files (module fixtures build once): 2 cut the wall time
# on a 2-core CI machine (24.6 -> 16.4 min); TEST_WORKERS=0 runs in this process, one test after the other.
TEST_WORKERS ?= 2
test: install $(VENV)/.triton
	$(MAKE) reproduce
	$(PY) -m pytest -q -ra --durations=15 $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile) tests

$(VENV)/.triton: $(VENV)/.installed
	$(if $(TRITON),$(PY) -m pip install -q "$(TRITON)")
	touch $@

# Every published recipe this machine can build, into $(STORE): skipped ones say why; built ones are cache hits.
engines: install
	$(PY) -m engine_factory.engines --store $(STORE)

# Rebuild, in a fresh store, the recipes that record expect.hash (small real models from ../shared) and check
# the hash, the rank files' sha256 and the validation bounds. After an intended change of engine bytes:
# $(PY) -m engine_factory.engines --record --recipes NAME, and commit the recipe.
reproduce: install
	$(PY) -m engine_factory.engines --reproduce

test-cuda: install
	$(PY) -m pytest -q -ra -m cuda tests

# Issue 10's table on a GPU machine (one run, ~13 min on an H200; the device tool's 10-minute calls split it
# by --cases: tests/perf/gpu_call.sh): builds the LLaMA-2 7B dummy engines, runs
# runtime.bench --compile, the start-up row and the peers, writes docs/benchmarks.md and $(BENCH_OUT)/gpu.jsonl.
# `make bench BENCH=cpu`: engine vs transformers generate on this CPU; BENCH_FLAGS=--quick: tiny engines.
BENCH      ?= gpu
BENCH_OUT  ?= $(CURDIR)/bench-out
BENCH_FLAGS ?=
bench: install
	$(PY) tests/perf/bench_table.py $(BENCH) --out $(BENCH_OUT) --doc docs/benchmarks.md $(BENCH_FLAGS)

clean:
	rm -rf $(STORE) .pytest_cache
