# make bench: the whole benchmark on real Fashion-MNIST (train AMO-PGD, attack, margins, entry),
#             then the leaderboard as Markdown, CSV, a static web page and plots.
# make test:  the test suite, offline, on the CPU.
# make benchmark: the speed benchmark (benchmarks/speed.py), about 25 min; benchmarks/RESULTS.md.
# make container: the container image (podman; CONTAINER_ENGINE=docker works the same), built offline
#             from ./wheels on a debootstrap bookworm base (docker/build-base.sh, docker/wheels.sh).
# make test-container: builds it and runs a tiny benchmark job inside with --network none, then
#             compares the entry with the same job run outside (tests/test_container.py, slow).
# make study: the all-layer margin study (studies/all-layer-margin/): 15 models, AutoAttack on
#             1000 points each (the fast suite), a sweep, RESULTS.md; under an hour on 2 cores.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The PyTorch build to install; override for another platform, e.g. make TORCH="torch torchvision".
TORCH ?= torch==2.14.1 torchvision==0.29.1
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

# The default benchmark: a small CNN trained with AMO-PGD, Linf eps 0.1, AutoAttack on 500 points.
# It keeps the plain AMO-PGD form and 100-step margin searches, the settings the committed entry
# was made with, so that the entry stays reproducible.
BENCH_ID ?= cnn-small-amo-pgd-fmnist
BENCH_CKPT := runs/$(BENCH_ID).safetensors
BENCH_TRAIN ?= --method amo-pgd --arch cnn-small --dataset fashion-mnist --epochs 8 \
	--pgd-steps 3 --eps 0.1 --eps-warmup-epochs 1 --seed 0 --amo-form plain
BENCH_EVAL ?= --eps 0.1 --threat-model Linf --suite standard --n-examples 500 --seed 0 \
	--margin-steps 100 --fmn-steps 100
# Where make bench writes the static leaderboard page (open index.html in a browser).
BENCH_SITE ?= leaderboards/site

# The study file make study runs; STUDY_ARGS passes more options (e.g. --no-sweep, --set ...).
STUDY ?= studies/all-layer-margin/study.toml
STUDY_ARGS ?=

# The container engine and options for build and run. runc and cgroupfs suit a podman without
# systemd (and work with one); the ulimits keep runc from asking for more than a container host
# with low hard limits grants. Override on the command line, e.g. make container CONTAINER_ENGINE=docker.
CONTAINER_ENGINE ?= podman --runtime runc --cgroup-manager cgroupfs
CONTAINER_RUN_ARGS ?= --ulimit nofile=1024:1024 --ulimit nproc=1024:1024
CONTAINER_IMAGE ?= localhost/robustbench-alm
CONTAINER_BASE ?= localhost/bookworm-minbase
# The default image: CPU-only torch from ./wheels, without torchvision (see the Dockerfile).
CONTAINER_BUILD_ARGS ?= --build-arg BASE=$(CONTAINER_BASE) --build-arg WHEELS=wheels \
	--build-arg TORCHVISION=no
CONTAINER_ENV = CONTAINER_ENGINE="$(CONTAINER_ENGINE)" CONTAINER_RUN_ARGS="$(CONTAINER_RUN_ARGS)" \
	CONTAINER_IMAGE="$(CONTAINER_IMAGE)" CONTAINER_BASE="$(CONTAINER_BASE)"

.PHONY: bench study benchmark test test-slow install data clean container container-base \
	container-wheels test-container

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install $(TORCH)
	$(BIN)/pip install -e '.[test,ray,timm]'
	# torchattacks pins an old requests; its real needs (torch, numpy, scipy) are already here.
	$(BIN)/pip install --no-deps torchattacks==3.5.1
	touch $@

install: $(BIN)/.installed

# Fashion-MNIST from Debian's package where apt exists; otherwise the loader downloads it.
data:
	@if [ -d /usr/share/datasets/fashion-mnist ]; then :; \
	elif command -v apt-get >/dev/null; then \
		$(SUDO) apt-get install -y dataset-fashion-mnist || \
		{ $(SUDO) apt-get update && $(SUDO) apt-get install -y dataset-fashion-mnist; } || \
		echo "apt could not install dataset-fashion-mnist; the loader will try a download"; \
	else echo "no apt-get: the loader will download Fashion-MNIST through torchvision"; fi

bench: install data
	$(BIN)/robustbench-alm train $(BENCH_TRAIN) --out $(BENCH_CKPT)
	$(BIN)/robustbench-alm evaluate $(BENCH_CKPT) $(BENCH_EVAL) --entry-id $(BENCH_ID) --force \
		--name "cnn-small, AMO-PGD (Linf 0.1), 8 epochs"
	$(BIN)/robustbench-alm leaderboard --html $(BENCH_SITE) --csv leaderboards/leaderboard.csv \
		--plots leaderboards/plots
	@echo "web page: $(BENCH_SITE)/index.html"

# The speed benchmark: fast against standard, fused AMO-PGD, margin search; benchmarks/RESULTS.md.
benchmark: install data
	$(BIN)/python benchmarks/speed.py $(BENCHMARK_ARGS)

study: install data
	$(BIN)/robustbench-alm study $(STUDY) $(STUDY_ARGS)

test: install
	$(BIN)/python -m pytest

test-slow: install
	$(BIN)/python -m pytest -m "slow and not container"

# The base image, once (debootstrap needs root and the Debian mirror).
container-base:
	@$(CONTAINER_ENGINE) image inspect $(CONTAINER_BASE) >/dev/null 2>&1 || \
		ENGINE="$(firstword $(CONTAINER_ENGINE))" \
		ENGINE_ARGS="$(wordlist 2,99,$(CONTAINER_ENGINE))" IMAGE=$(CONTAINER_BASE) \
		docker/build-base.sh

# The wheel folder, once (docker/wheels.sh TORCH=... for another PyTorch build; rm -r wheels to redo).
wheels/.done:
	docker/wheels.sh wheels
	touch $@

container-wheels: wheels/.done

container: container-base container-wheels
	$(CONTAINER_ENGINE) build $(CONTAINER_RUN_ARGS) $(CONTAINER_BUILD_ARGS) -t $(CONTAINER_IMAGE) .

test-container: install container
	$(CONTAINER_ENV) CONTAINER_BUILD_ARGS="$(CONTAINER_BUILD_ARGS)" \
		$(BIN)/python -m pytest -m container -s -v tests/test_container.py

clean:
	rm -rf runs .pytest_cache test-artifacts
