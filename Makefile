# Two commands are all a user needs:  make test   and   make book
# Both create .venv (Python 3.11) themselves on first use.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
export GEMMA2_LITE_PROFILE ?= ci
# Keep JAX from grabbing a TPU/GPU's whole memory when notebooks run side by side.
export XLA_PYTHON_CLIENT_PREALLOCATE ?= false

.PHONY: test book browser venv bench clean help colab-check student instructor slides

help:
	@echo "make test   - set up .venv, run every test (unit, parity, notebooks, the built book)"
	@echo "make book   - set up .venv, execute every notebook and build the HTML book in _build/html"
	@echo "make bench  - run the speed/memory benchmarks (prints ratios; the 2B at 4 layers)"
	@echo "make colab-check - execute every chapter at the colab profile on this CPU, loops capped"
	@echo "make student - what students get, in _build/student: the chapters with exercise stubs,"
	@echo "               each assignment's starter, public tests and rubric (no solutions)"
	@echo "make instructor - what instructors get, in _build/instructor: chapters, assignments with"
	@echo "               reference solutions, hidden tests and wrong answers, the course pages"
	@echo "make slides - a lecture deck per chapter, from its cells tagged slide, in _build/slides"
	@echo "              (self-contained HTML, math offline; after make book they show the figures)"

venv: $(STAMP)

# pyproject.toml says what the package needs (ranges); constraints.txt, the lock, says exactly
# which versions this venv gets, so every machine tests the same thing.
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[book,test]'
	touch $(STAMP)

# Two workers: one builds the book (executing every notebook), the other runs the rest.
# --dist loadscope keeps each test file on one worker (the book's tests share one build).
# (--dist loadgroup would be finer, but with pytest 9.2 and xdist 3.8 it ignores xdist_group
# marks and split the book's tests: one worker then sat out the build waiting on its lock.)
# --no-loadscope-reorder hands the files out in collection order, which tests/conftest.py makes
# book first: by default xdist sends the files with the most tests first, and the book's build,
# the longest job, started five minutes late.
test: $(STAMP) browser
	$(BIN)/python -m pytest tests -q -n 2 --dist loadscope --no-loadscope-reorder --durations=15

# The book at the ci profile goes to _build/html; any other profile builds into
# _build/profile-<name>/_build/html with its own jupyter-cache, so cached outputs of one profile
# are never served as another's (jupyter-cache keys on the code cells, not the environment).
# --all re-reads every page on every build (cheap: unchanged notebooks come from the cache), so a
# warning in a page that has not changed since the last build still fails the build.
BOOK_OUT   := $(if $(filter ci,$(GEMMA2_LITE_PROFILE)),.,_build/profile-$(GEMMA2_LITE_PROFILE))
BOOK_FLAGS := --warningiserror --nitpick --keep-going --all

book: $(STAMP)
	$(BIN)/jupyter-book build . --path-output $(BOOK_OUT) $(BOOK_FLAGS)

# tests/test_book.py opens the built book in headless Chromium. Installed here when missing
# (Debian/Ubuntu, as root); otherwise say what to install and let the tests report it.
browser:
	@[ -n "$$CHROMIUM" ] || command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing chromium (for tests/test_book.py)"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	  else \
	    echo "tests/test_book.py needs headless Chromium: run 'sudo apt-get install chromium'" \
	         "(Debian/Ubuntu) or put a chromium binary on PATH (or set CHROMIUM=/path/to/chrome)."; \
	  fi; }

# Every chapter at the colab profile, on a CPU: the colab shapes with training loops and
# repetitions capped at LOOP_CAP iterations (GEMMA2_LITE_LOOP_CAP). Prints each chapter's time.
LOOP_CAP ?= 3
# Offline (GEMMA2_LITE_OFFLINE): chapters that want the real Gemma 2 run on its release-layout
# fixture, and say so, unless the real files are already in $GEMMA2_LITE_WEIGHTS.
colab-check: $(STAMP)
	GEMMA2_LITE_OFFLINE=1 $(BIN)/python tools/run_notebooks.py --profile colab --loop-cap $(LOOP_CAP)

# real_size.py runs the 2B's width and vocabulary with 4 of its 26 layers (1.8 GB of bf16
# weights); the real 2B is `python benchmarks/real_size.py` (5.2 GB of weights).
bench: $(STAMP)
	$(BIN)/python benchmarks/forward.py
	$(BIN)/python benchmarks/generate.py
	$(BIN)/python benchmarks/train_step.py
	$(BIN)/python benchmarks/memory_plan.py
	$(BIN)/python benchmarks/real_size.py --layers 4

# What students get: the chapters with each exercise's solution replaced by its stub, and per
# assignment (assignments/) the starter notebook, public tests, conftest.py and rubric; never a
# reference solution, hidden test or wrong answer (tests/test_assignments.py checks both
# builds). Standard library only.
student:
	$(PYTHON) tools/student_copy.py _build/student

# What instructors get: everything, solutions and hidden tests included, and the course pages.
instructor:
	$(PYTHON) tools/student_copy.py --instructor _build/instructor

# Lecture slides: one self-contained HTML deck per chapter from the cells it tags `slide`
# (tools/slides.py), with the executed outputs of the last `make book` when they match the
# chapter's code. Open _build/slides/index.html; no network needed.
slides: $(STAMP)
	$(BIN)/python tools/slides.py

clean:
	rm -rf _build .pytest_cache
