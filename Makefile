# its — one non-recursive Makefile for every library, binary, test and fuzz target.
#
#   make            deps + libraries and binaries into build/
#   make test       deps + build + the whole test suite, then again under ASan+UBSan
#   make asan       the sanitizer build into build/asan/
#   make fuzz       libFuzzer targets (clang), each run FUZZ_SECONDS
#   make demo       the whole service on the bundled model
#   make bench      engine benchmarks (docs/BENCHMARKS.md)
#   make deps       install missing Debian packages (apt-get, non-interactive)
#
# Knobs: CUDA=auto|0|1, SYSTEMD=auto|0|1, BUILD=dir, SAN=1, V=1, FUZZ_SECONDS=60.
#
# Layout of the output: $(BUILD)/bin (itsd itsw itsctl), $(BUILD)/lib (libits, libits_cuda.so,
# internal archives), $(BUILD)/obj (objects mirroring the sources), $(BUILD)/tests, $(BUILD)/fuzz.
# The top-level goals first make sure the Debian packages exist, then re-enter make so that
# pkg-config is asked only once the packages are there.

.DEFAULT_GOAL := all
SHELL := /bin/bash

BUILD ?= build
PREFIX ?= /usr/local
DESTDIR ?=
VERSION := 0.1.0
CUDA ?= auto
SYSTEMD ?= auto
SAN ?= 0
FUZZ_SECONDS ?= 60
V ?= 0

ifeq ($(V),1)
Q :=
else
Q := @
endif

DEB_PKGS := build-essential pkg-config clang libclang-rt-dev libzmq3-dev libmsgpack-dev libev-dev \
            libpcre2-dev libjansson-dev libinih-dev libsystemd-dev libcriterion-dev \
            libopenblas-dev libmicrohttpd-dev python3 iproute2 tcpdump

# ---------------------------------------------------------------------------------------------
# Entry points that install dependencies first, then build in a sub-make.
# ---------------------------------------------------------------------------------------------
ifndef ITS_INNER

.PHONY: all test asan fuzz demo bench deps clean install check-one

all test asan fuzz demo bench install check-one: deps
	$(Q)$(MAKE) --no-print-directory ITS_INNER=1 $@-inner

# Installs only what is missing; nothing at all (not even apt-get update) when all is there.
deps:
	@missing=""; for p in $(DEB_PKGS); do \
	    dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q 'install ok installed' \
	        || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	    echo "deps: installing$$missing"; \
	    sudo=""; [ "$$(id -u)" -ne 0 ] && sudo=sudo; \
	    $$sudo env DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
	    $$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	        $$missing >/dev/null || { echo "deps: apt-get install failed"; exit 1; }; \
	fi

clean:
	rm -rf $(BUILD)

else # ITS_INNER ---------------------------------------------------------------------------------

# ---------------------------------------------------------------------------------------------
# Toolchain and optional parts, detected once.
# ---------------------------------------------------------------------------------------------
CC ?= cc
FUZZ_CC ?= clang
NVCC ?= $(firstword $(shell command -v nvcc 2>/dev/null) $(wildcard /usr/local/cuda/bin/nvcc))
CUDA_HOME ?= $(patsubst %/bin/nvcc,%,$(NVCC))

ifeq ($(CUDA),0)
HAVE_CUDA := 0
else ifneq ($(NVCC),)
HAVE_CUDA := 1
else ifeq ($(CUDA),1)
$(error CUDA=1 but nvcc was not found (looked in PATH and /usr/local/cuda/bin))
else
HAVE_CUDA := 0
endif

HAVE_NCCL := $(if $(and $(filter 1,$(HAVE_CUDA)),$(wildcard $(CUDA_HOME)/include/nccl.h)),1,0)

ifeq ($(SYSTEMD),0)
HAVE_SYSTEMD := 0
else
HAVE_SYSTEMD := $(shell pkg-config --exists libsystemd && echo 1 || echo 0)
ifeq ($(SYSTEMD)$(HAVE_SYSTEMD),10)
$(error SYSTEMD=1 but libsystemd (pkg-config libsystemd) was not found)
endif
endif

# libev has no .pc on Debian 12: a one-line compile probe instead.
HASH := \#
HAVE_LIBEV := $(shell printf '$(HASH)include <ev.h>\nint main(void){return ev_version_major()<4;}' | \
                $(CC) -x c - -lev -o /dev/null 2>/dev/null && echo 1 || echo 0)
ifneq ($(HAVE_LIBEV),1)
$(error libev not found: install libev-dev (make deps))
endif

ARCH := $(shell uname -m)
ifeq ($(ARCH),x86_64)
ARCH_FLAGS ?= -march=x86-64-v3
endif

PKGS := libzmq msgpack libpcre2-8 jansson inih openblas libmicrohttpd
PKG_CFLAGS := $(shell pkg-config --cflags $(PKGS))
PKG_LIBS := $(shell pkg-config --libs $(PKGS)) -lev
ifeq ($(HAVE_SYSTEMD),1)
PKG_CFLAGS += $(shell pkg-config --cflags libsystemd) -DITS_HAVE_SYSTEMD=1
PKG_LIBS += $(shell pkg-config --libs libsystemd)
endif

OPT ?= -O2
WARN := -Wall -Wextra -Werror -Wshadow -Wstrict-prototypes -Wmissing-prototypes -Wformat=2 \
        -Wvla -Wno-unused-parameter
ifeq ($(SAN),1)
SAN_FLAGS := -fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined
OPT := -O1
endif
INCLUDES := -Iprotocol -Iworkers -Ikernels -Iclient -Iorchestrator
CFLAGS_ALL := -std=c17 -D_GNU_SOURCE $(OPT) -g $(ARCH_FLAGS) $(WARN) -fPIC -pthread -MMD -MP \
              $(SAN_FLAGS) $(INCLUDES) $(PKG_CFLAGS) -DITS_HAVE_CUDA=$(HAVE_CUDA) \
              -DITSD_TEMPLATES_DIR='"$(PREFIX)/share/its/prompts"' -DITS_VERSION='"$(VERSION)"' $(CFLAGS)
LDFLAGS_ALL := -pthread $(SAN_FLAGS) $(LDFLAGS)
LIBS_ALL := $(PKG_LIBS) -ldl -lm

OBJ := $(BUILD)/obj
BIN := $(BUILD)/bin
LIB := $(BUILD)/lib

# ---------------------------------------------------------------------------------------------
# Sources by role. Each directory's library is its *.c minus the files that hold a main().
# ---------------------------------------------------------------------------------------------
PROTO_SRCS := $(wildcard protocol/*.c)
ENGINE_SRCS := $(filter-out workers/itsw%.c,$(wildcard workers/*.c))
ITSW_SRCS := $(wildcard workers/itsw*.c)
CLIENT_SRCS := $(filter-out client/itsctl%.c,$(wildcard client/*.c))
ITSCTL_SRCS := $(wildcard client/itsctl*.c)
ORCH_SRCS := $(filter-out orchestrator/itsd.c,$(wildcard orchestrator/*.c))
ITSD_SRCS := $(wildcard orchestrator/itsd.c)
CUDA_SRCS := $(wildcard kernels/*.cu)
TEST_SRCS := $(wildcard tests/test_*.c)
TEST_UTIL_SRCS := $(filter-out tests/test_%.c,$(wildcard tests/*.c))
FUZZ_SRCS := $(wildcard tests/fuzz/fuzz_*.c)

objs = $(patsubst %.c,$(OBJ)/%.o,$(1))

PROTO_LIB := $(LIB)/libitsproto.a
ENGINE_LIB := $(LIB)/libitsengine.a
ORCH_LIB := $(LIB)/libitsorch.a
CLIENT_LIB := $(LIB)/libits.a
CLIENT_SO := $(LIB)/libits.so
CUDA_SO := $(if $(and $(filter 1,$(HAVE_CUDA)),$(CUDA_SRCS)),$(LIB)/libits_cuda.so)

BINS := $(if $(ITSD_SRCS),$(BIN)/itsd) $(if $(ITSW_SRCS),$(BIN)/itsw) \
        $(if $(ITSCTL_SRCS),$(BIN)/itsctl)
LIBS := $(if $(PROTO_SRCS),$(PROTO_LIB)) $(if $(ENGINE_SRCS),$(ENGINE_LIB)) \
        $(if $(ORCH_SRCS),$(ORCH_LIB)) $(if $(CLIENT_SRCS),$(CLIENT_LIB) $(CLIENT_SO)) $(CUDA_SO)
TESTS_BIN := $(BUILD)/tests/its_tests

.PHONY: all-inner test-inner asan-inner fuzz-inner demo-inner bench-inner install-inner \
        check-one-inner summary

summary:
	@echo "its build ($(BUILD)): cc=$(CC) $(if $(filter 1,$(SAN)),[asan+ubsan])" \
	      "$(if $(filter 1,$(HAVE_CUDA)),✓ CUDA ($(NVCC)),✗ CUDA)" \
	      "$(if $(filter 1,$(HAVE_NCCL)),✓ NCCL,✗ NCCL)" \
	      "$(if $(filter 1,$(HAVE_SYSTEMD)),✓ systemd,✗ systemd)" "✓ libev ✓ zmq ✓ msgpack"

all-inner: summary $(LIBS) $(BINS)

# -- objects -------------------------------------------------------------------------------
$(OBJ)/%.o: %.c
	@mkdir -p $(@D)
	@$(if $(filter 1,$(V)),,echo "  CC      $<")
	$(Q)$(CC) $(CFLAGS_ALL) -c $< -o $@

# -- internal archives ---------------------------------------------------------------------
$(PROTO_LIB): $(call objs,$(PROTO_SRCS))
$(ENGINE_LIB): $(call objs,$(ENGINE_SRCS))
$(ORCH_LIB): $(call objs,$(ORCH_SRCS))
# libits.a carries the protocol code too, so that static users link one library.
$(CLIENT_LIB): $(call objs,$(CLIENT_SRCS)) $(call objs,$(PROTO_SRCS))
$(LIB)/%.a:
	@mkdir -p $(@D)
	@$(if $(filter 1,$(V)),,echo "  AR      $@")
	$(Q)rm -f $@ && ar rcs $@ $^

# libits.so.0 carries the protocol code with it so users link one library; the version
# script exports only its_*.
$(CLIENT_SO): $(LIB)/libits.so.0
	$(Q)ln -sf libits.so.0 $@
$(LIB)/libits.so.0: $(call objs,$(CLIENT_SRCS)) $(call objs,$(PROTO_SRCS)) client/libits.map
	@mkdir -p $(@D)
	@$(if $(filter 1,$(V)),,echo "  LD      $@")
	$(Q)$(CC) -shared -Wl,-soname,libits.so.0 -Wl,--version-script=client/libits.map \
	    $(LDFLAGS_ALL) -o $@ $(filter %.o,$^) $(LIBS_ALL)

# -- binaries -------------------------------------------------------------------------------
$(BIN)/itsd: $(call objs,$(ITSD_SRCS)) $(ORCH_LIB) $(PROTO_LIB)
$(BIN)/itsw: $(call objs,$(ITSW_SRCS)) $(ENGINE_LIB) $(PROTO_LIB)
$(BIN)/itsctl: $(call objs,$(ITSCTL_SRCS)) $(CLIENT_LIB) $(PROTO_LIB)
$(BIN)/%:
	@mkdir -p $(@D)
	@$(if $(filter 1,$(V)),,echo "  LD      $@")
	$(Q)$(CC) $(LDFLAGS_ALL) -o $@ $^ $(LIBS_ALL)

# -- CUDA plugin: kernels/*.cu + cuBLAS, opened by itsw at run time with dlopen so that a
#    binary built with CUDA still starts where there is no driver or toolkit.
CUDA_ARCHS ?= 80 90
NVCC_FLAGS := -O2 -std=c++17 -Xcompiler -fPIC -Ikernels -Iworkers \
              $(foreach a,$(CUDA_ARCHS),-gencode arch=compute_$(a),code=sm_$(a))
$(OBJ)/%.cu.o: %.cu
	@mkdir -p $(@D)
	@$(if $(filter 1,$(V)),,echo "  NVCC    $<")
	$(Q)$(NVCC) $(NVCC_FLAGS) -MMD -MP -c $< -o $@
$(LIB)/libits_cuda.so: $(patsubst %.cu,$(OBJ)/%.cu.o,$(CUDA_SRCS)) $(OBJ)/workers/fwd_check.o $(OBJ)/workers/rope.o kernels/plugin.map
	@mkdir -p $(@D)
	@$(if $(filter 1,$(V)),,echo "  LD      $@")
	$(Q)$(NVCC) -shared -o $@ $(filter-out %.map,$^) -Xlinker --no-undefined -Xlinker --version-script=kernels/plugin.map -L$(CUDA_HOME)/lib64 -lcublas -lcublasLt -lcudart_static -ldl -lrt -lpthread

# -- tests ------------------------------------------------------------------------------------
# One Criterion binary holds the whole suite (one summary line); build/tests/test_X holds one
# file's tests for quick iteration (make check-one T=X).
TEST_LINK := $(call objs,$(TEST_UTIL_SRCS)) $(filter %.a,$(LIBS))
$(TESTS_BIN): $(call objs,$(TEST_SRCS)) $(TEST_LINK)
	@mkdir -p $(@D)
	@$(if $(filter 1,$(V)),,echo "  LD      $@")
	$(Q)$(CC) $(LDFLAGS_ALL) -o $@ $^ $(LIBS_ALL) -lcriterion
# DEPS="workers/a.c workers/b.c" links only those sources, so one module's tests build while
# another module is half-written; without DEPS every library is linked.
ONE_LINK := $(if $(DEPS),$(call objs,$(DEPS) $(TEST_UTIL_SRCS)),$(TEST_LINK))
$(BUILD)/tests/test_%: $(OBJ)/tests/test_%.o $(ONE_LINK)
	@mkdir -p $(@D)
	$(Q)$(CC) $(LDFLAGS_ALL) -o $@ $^ $(LIBS_ALL) -lcriterion

# Tests find the binaries and shared data through the environment.
TEST_ENV := ITS_BUILD=$(abspath $(BUILD)) ITS_SRC=$(CURDIR) ITS_SHARED=$(abspath ../shared)
CRITERION_FLAGS ?= --jobs 2

# Under the sanitizers a leak is reported when a test's process exits, which Criterion does
# not count as a failure: the log is searched for any sanitizer report as well.
test-inner: all-inner $(TESTS_BIN)
	@echo "== tests ($(BUILD)) =="
ifeq ($(SAN),1)
	$(Q)set -o pipefail; $(TEST_ENV) ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 \
	    LSAN_OPTIONS=suppressions=$(CURDIR)/tests/lsan.supp:print_suppressions=0 \
	    UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
	    $(TESTS_BIN) $(CRITERION_FLAGS) 2>&1 | tee $(BUILD)/tests.log
	$(Q)if grep -qE 'ERROR: (Leak|Address)Sanitizer|runtime error:' $(BUILD)/tests.log; then \
	    echo "sanitizer reports in $(BUILD)/tests.log:"; \
	    grep -E -A12 'ERROR: (Leak|Address)Sanitizer|runtime error:' $(BUILD)/tests.log | head -80; \
	    exit 1; fi
else
	$(Q)$(TEST_ENV) $(TESTS_BIN) $(CRITERION_FLAGS)
endif
ifneq ($(SAN),1)
	$(Q)$(MAKE) --no-print-directory ITS_INNER=1 BUILD=$(BUILD)/asan SAN=1 CUDA=0 test-inner
endif

check-one-inner: $(BUILD)/tests/test_$(T)
	$(Q)$(TEST_ENV) $(BUILD)/tests/test_$(T) $(CRITERION_FLAGS)

asan-inner:
	$(Q)$(MAKE) --no-print-directory ITS_INNER=1 BUILD=$(BUILD)/asan SAN=1 CUDA=0 all-inner

# -- fuzzing (libFuzzer, clang) ------------------------------------------------------------
FUZZ_DIR := $(BUILD)/fuzz
FUZZ_CFLAGS := -std=c17 -D_GNU_SOURCE -O1 -g -fsanitize=fuzzer,address,undefined \
               -fno-sanitize-recover=undefined $(INCLUDES) $(PKG_CFLAGS)
FUZZ_BINS := $(patsubst tests/fuzz/fuzz_%.c,$(FUZZ_DIR)/fuzz_%,$(FUZZ_SRCS))
# A target links the protocol sources unless FUZZ_WITH_<name> names others (the parsers of
# checkpoint and tokenizer files live in workers/).
FUZZ_WITH_safetensors := workers/safetensors.c workers/checkpoint.c
FUZZ_WITH_checkpoint_config := workers/safetensors.c workers/checkpoint.c
FUZZ_WITH_tokenizer_json := workers/tokenizer.c
fuzz_with = $(or $(FUZZ_WITH_$(1)),$(PROTO_SRCS))
.SECONDEXPANSION:
$(FUZZ_DIR)/fuzz_%: tests/fuzz/fuzz_%.c $$(call fuzz_with,$$*) $(wildcard protocol/*.h workers/*.h tests/fuzz/*.h)
	@mkdir -p $(@D)
	@echo "  FUZZCC  $@"
	$(Q)$(FUZZ_CC) $(FUZZ_CFLAGS) -o $@ $< $(call fuzz_with,$*) $(PKG_LIBS) -lm

# Each target runs FUZZ_SECONDS on its seed corpus (tests/fuzz/corpus/NAME), growing a working
# corpus under build/ so the committed seeds stay small.
fuzz-inner: $(FUZZ_BINS)
	$(Q)set -e; for f in $(FUZZ_BINS); do \
	    n=$${f##*/fuzz_}; work=$(FUZZ_DIR)/corpus/$$n; mkdir -p $$work; \
	    echo "== fuzz $$n for $(FUZZ_SECONDS)s =="; \
	    $$f -max_total_time=$(FUZZ_SECONDS) -timeout=5 -rss_limit_mb=2048 -max_len=65536 \
	        -print_final_stats=1 $$work tests/fuzz/corpus/$$n 2>&1 | tail -n 12; \
	    test $${PIPESTATUS[0]} -eq 0; \
	done

# -- demo and bench live in their own scripts ---------------------------------------------------
demo-inner: all-inner
	$(Q)ITS_BUILD=$(abspath $(BUILD)) ./deploy/demo.sh

bench-inner: all-inner
	$(Q)ITS_BUILD=$(abspath $(BUILD)) ./deploy/bench.sh
ifeq ($(HAVE_CUDA),1)
	$(Q)if nvidia-smi -L >/dev/null 2>&1; then \
	    ITS_BUILD=$(abspath $(BUILD)) ITS_COMMIT=$$(git describe --always --dirty 2>/dev/null) \
	    ./deploy/gpu_session.sh bench; \
	else echo "== cuda bench skipped: no GPU (nvidia-smi -L failed)"; fi
endif

# -- install: binaries, libits (+ header, pkg-config file), the cuda plugin, role templates,
#    example configs, the systemd units and the docs. PREFIX is also baked into itsd's default
#    templates directory. Units go to $(PREFIX)/lib/systemd/system, which systemd searches for
#    PREFIX=/usr/local and PREFIX=/usr alike; another PREFIX needs UNITDIR=/etc/systemd/system
#    (docs/operations.md). The units name $(PREFIX)/bin and $(CONFDIR) (sed @bindir@ ...).
#    Configs in CONFDIR are installed only when absent, so that an upgrade keeps the local
#    ones; pristine copies always go to $(PREFIX)/share/its/examples (their templates path
#    rewritten to the installed one). install-files-inner installs what is built and builds
#    nothing (tests/test_deploy.c runs it beside a build); the cuda plugin goes when built.
UNITDIR ?= $(PREFIX)/lib/systemd/system
CONFDIR ?= /etc/its
DOCDIR ?= $(PREFIX)/share/doc/its
UNITS := deploy/systemd/itsd.service deploy/systemd/itsw@.service deploy/systemd/its.target
ITS_UNIT_SED := -e 's|@bindir@|$(PREFIX)/bin|g' -e 's|@confdir@|$(CONFDIR)|g' \
                -e 's|@docdir@|$(DOCDIR)|g'
define its_install
	$(Q)set -e; d="$(DESTDIR)$(PREFIX)"; c="$(DESTDIR)$(CONFDIR)"; ex="$$d/share/its/examples"; \
	for f in $(BINS) $(LIB)/libits.so.0 $(CLIENT_LIB); do \
	    [ -e "$$f" ] || { echo "install: $$f is not built (run make first)"; exit 1; }; \
	done; \
	install -d "$$d/bin" "$$d/lib/pkgconfig" "$$d/lib/its" "$$d/include" \
	    "$$d/share/its/prompts" "$$ex/nemotron-70b" "$$c" "$(DESTDIR)$(UNITDIR)" \
	    "$(DESTDIR)$(DOCDIR)"; \
	install -m 755 $(BINS) "$$d/bin/"; \
	install -m 755 $(LIB)/libits.so.0 "$$d/lib/"; ln -sf libits.so.0 "$$d/lib/libits.so"; \
	install -m 644 $(CLIENT_LIB) "$$d/lib/"; \
	install -m 644 client/its.h "$$d/include/"; \
	sed -e 's|@prefix@|$(PREFIX)|g' -e 's|@libdir@|$(PREFIX)/lib|g' \
	    -e 's|@includedir@|$(PREFIX)/include|g' -e 's|@version@|$(VERSION)|g' \
	    -e '/^#/d' client/libits.pc.in > "$$d/lib/pkgconfig/libits.pc"; \
	$(if $(CUDA_SO),[ ! -e $(CUDA_SO) ] || install -m 755 $(CUDA_SO) "$$d/lib/its/";) \
	install -m 644 configs/prompts/*.tmpl "$$d/share/its/prompts/"; \
	sed -e 's|^templates = prompts$$|templates = $(PREFIX)/share/its/prompts|' \
	    configs/itsd.conf > "$$ex/itsd.conf"; \
	install -m 644 configs/itsw-*.conf "$$ex/"; \
	sed -e 's|^templates = \.\./prompts$$|templates = $(PREFIX)/share/its/prompts|' \
	    configs/nemotron-70b/itsd.conf > "$$ex/nemotron-70b/itsd.conf"; \
	install -m 644 configs/nemotron-70b/itsw-*.conf "$$ex/nemotron-70b/"; \
	chmod 644 "$$ex/itsd.conf" "$$ex/nemotron-70b/itsd.conf"; \
	for f in "$$ex"/*.conf; do \
	    if [ -e "$$c/$${f##*/}" ]; then echo "kept $$c/$${f##*/} (new one: $$f)"; \
	    else install -m 644 "$$f" "$$c/"; fi; \
	done; \
	for u in $(UNITS); do \
	    sed $(ITS_UNIT_SED) "$$u" > "$(DESTDIR)$(UNITDIR)/$${u##*/}"; \
	    chmod 644 "$(DESTDIR)$(UNITDIR)/$${u##*/}"; \
	done; \
	install -m 644 docs/*.md "$(DESTDIR)$(DOCDIR)/"; \
	echo "installed into $(DESTDIR)$(PREFIX) (configs in $$c, units in $(DESTDIR)$(UNITDIR))"
endef

.PHONY: install-files-inner
install-inner: all-inner
	$(its_install)
install-files-inner:
	$(its_install)

-include $(shell find $(BUILD)/obj -name '*.d' 2>/dev/null)

endif # ITS_INNER
