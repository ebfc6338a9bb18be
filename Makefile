# proactor: set-up, test and run targets.  `make test` works on a fresh
# Debian/Ubuntu machine: it installs what's missing, creates .venv, then runs pytest.

PYTHON     ?= python3
VENV       ?= .venv
HOST       ?= 127.0.0.1
PORT       ?= 8000
PYTEST_ARGS ?=
URING_H    ?= /usr/include/liburing.h

PY    := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Empty when root, sudo otherwise.
SUDO  := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
APT_INSTALL := $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends

# Anything that changes the build of the package or its extension.
BUILD_INPUTS := pyproject.toml setup.py $(wildcard _build/*.py _build/*.c _build/*.h)

.PHONY: all deps venv .venv run test test-all bench-deps lint clean

all: test

# System packages: apt-get update comes first (a fresh machine may have no package lists).
deps:
	@need=""; \
	[ -f $(URING_H) ] || need="$$need liburing-dev"; \
	command -v cc >/dev/null 2>&1 || need="$$need gcc libc6-dev"; \
	command -v taskset >/dev/null 2>&1 || need="$$need util-linux"; \
	command -v curl >/dev/null 2>&1 || need="$$need curl"; \
	command -v openssl >/dev/null 2>&1 || need="$$need openssl"; \
	if [ -n "$$need" ]; then \
	    echo "deps: installing$$need"; \
	    $(SUDO) apt-get update && $(APT_INSTALL) $$need; \
	else \
	    echo "deps: liburing-dev, cc, taskset, curl, openssl present"; \
	fi

venv .venv: $(STAMP)

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

# Editable install; with cffi_modules it also builds proactor/_uring_cffi*.so in place.
# `deps` is order-only: it runs first but does not force a re-install.
$(STAMP): $(BUILD_INPUTS) | deps $(PY)
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

$(VENV)/.installed-bench: $(STAMP)
	$(PY) -m pip install --quiet -e '.[bench]'
	touch $@

$(VENV)/.installed-dev: $(STAMP)
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

# The HTTP/1.1 static file server, serving the demo site in examples/demo_site.
run: deps $(STAMP)
	$(PY) examples/http_server.py --host $(HOST) $(PORT)

# pytest's exit code is passed through as is (5 = no tests collected).
test: deps $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

# The suite on every supported Python found here (3.10 to 3.13), one .venv-3.X each;
# SKIP="3.11" leaves versions out, REQUIRE_ALL=1 fails on a missing one (tools/test-all.sh).
test-all: deps
	SKIP="$(SKIP)" REQUIRE_ALL="$(REQUIRE_ALL)" PYTEST_ARGS="$(PYTEST_ARGS)" tools/test-all.sh

# The C layer built with AddressSanitizer and UndefinedBehaviorSanitizer
# (PROACTOR_SANITIZE=1, see _build/build_uring.py) into $(SAN_DIR), never over the normal
# build in proactor/, then the engine and asyncio tests run on it. The rest of the package
# is linked into $(SAN_DIR) file by file; PYTHONPATH puts it ahead of the editable install.
# Python is not built with ASan, so its runtime is preloaded (and so inherited by every
# child process of the tests).
# * UBSan: a report aborts the test process (pytest's faulthandler then names the test);
#   --capture=sys leaves fd 2 to the report. The target fails.
# * ASan: an error aborts too, and is written to $(SAN_LOG).<pid>.
# * LeakSanitizer (SAN_LEAKS=0 turns it off) writes to the same files, at each process's
#   exit, also CPython's memory and the child processes': _build/sanitizer_logs.py fails
#   the target on ASan errors and on leaks allocated by the extension, and ignores the rest.
SAN_DIR   := build/sanitize
SAN_LOG   := $(CURDIR)/$(SAN_DIR)/asan
SAN_LEAKS ?= 1
SAN_TESTS ?= tests/test_nothing_lost.py tests/test_engine.py tests/test_ops.py tests/test_close.py tests/test_echo.py \
             tests/test_memory_safety.py tests/test_sendfile.py tests/test_copy.py \
             tests/test_workers.py tests/aio
LIBASAN   ?= $(shell cc -print-file-name=libasan.so)
SAN_ENV    = LD_PRELOAD=$(LIBASAN) PYTHONPATH=$(CURDIR)/$(SAN_DIR) PYTHONUNBUFFERED=1 \
             UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1:abort_on_error=1 \
             ASAN_OPTIONS=abort_on_error=1:detect_leaks=$(SAN_LEAKS):log_path=$(SAN_LOG) \
             LSAN_OPTIONS=exitcode=0

$(SAN_DIR)/.built: $(BUILD_INPUTS) | $(STAMP)
	@[ -f "$(LIBASAN)" ] || { echo "sanitize: $(LIBASAN) not found (gcc's libasan)"; exit 1; }
	rm -rf $(SAN_DIR)
	mkdir -p $(SAN_DIR)/proactor
	cd $(SAN_DIR) && PROACTOR_SANITIZE=1 $(CURDIR)/$(PY) $(CURDIR)/_build/build_uring.py \
	    >build.log 2>&1 || { cat build.log; exit 1; }
	touch $@

.PHONY: sanitize
sanitize: deps $(SAN_DIR)/.built
	ln -sf $(CURDIR)/proactor/*.py $(CURDIR)/proactor/py.typed $(SAN_DIR)/proactor/
	rm -f $(SAN_LOG).*
	cd / && $(SAN_ENV) $(CURDIR)/$(PY) -c 'import proactor._uring_cffi as m, sys; \
	    sys.exit(0 if m.__file__.startswith("$(CURDIR)/$(SAN_DIR)/") else \
	             "sanitize: imported " + m.__file__ + ", not the sanitizer build")'
	$(SAN_ENV) $(VENV)/bin/pytest --capture=sys $(SAN_TESTS) $(PYTEST_ARGS); rc=$$?; \
	$(PY) _build/sanitizer_logs.py $(SAN_LOG) || rc=1; exit $$rc

# Python peers (uvloop, trio, httptools) and nginx for bench/static_vs_nginx.sh.
bench-deps: $(VENV)/.installed-bench
	@command -v nginx >/dev/null 2>&1 || { $(SUDO) apt-get update && $(APT_INSTALL) nginx; }

# CPython's own event-loop tests (test_asyncio's test_events, and with the default
# CPYTHON_MODULES=all its socket, sendfile, buffered-protocol, server and TLS tests) on
# asyncio's loop, then on proactor's; one difference is allowed: test_internal_fds checks
# the selector loop's self-pipe and skips itself on any other loop.
CPYTHON_MODULES ?= all
.PHONY: cpython-asyncio
cpython-asyncio: deps $(STAMP)
	$(PY) tools/cpython_asyncio.py --allow 1 --module $(CPYTHON_MODULES)

lint: $(VENV)/.installed-dev
	$(VENV)/bin/ruff check .

clean:
	rm -rf build dist *.egg-info proactor/_uring_cffi* $(VENV) .venv-3.* .test-all-*.log \
	    .pytest_cache .ruff_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
