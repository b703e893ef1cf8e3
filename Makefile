# Two host environments that cannot share one interpreter:
#   .venv-mace   : mace-torch 0.3.16 with its pinned e3nn 0.4.4
#   .venv-nequip : nequip 0.19.1 and sevenn 0.13.0 with e3nn 0.6 and torch-geometric
# torch is pinned in every install step (a CPU build is on local disk; any other spec pulls CUDA wheels).
PYTHON ?= python3
TORCH := torch==2.13.0
MACE_ENV := .venv-mace
NEQUIP_ENV := .venv-nequip
PYTEST_ARGS ?= -q -p no:cacheprovider --durations=15

.PHONY: test test-mace test-nequip envs demo sevenn-demo benchmark clean

# The two environments' suites run side by side, one thread each (2 cores; their tests are small-tensor
# and mostly single-threaded, so running them serially left a core idle). Output is grouped per suite.
test: envs
	OMP_NUM_THREADS=1 $(MAKE) -j2 --output-sync=target test-mace test-nequip

envs: $(MACE_ENV)/.installed $(NEQUIP_ENV)/.installed

$(MACE_ENV)/.installed: pyproject.toml Makefile
	test -x $(MACE_ENV)/bin/python || $(PYTHON) -m venv $(MACE_ENV)
	$(MACE_ENV)/bin/pip install -q --disable-pip-version-check $(TORCH)
	$(MACE_ENV)/bin/pip install -q --disable-pip-version-check $(TORCH) "mace-torch==0.3.16"
	$(MACE_ENV)/bin/pip install -q --disable-pip-version-check $(TORCH) -e ".[mace,dev]"
	touch $@

$(NEQUIP_ENV)/.installed: pyproject.toml Makefile
	test -x $(NEQUIP_ENV)/bin/python || $(PYTHON) -m venv $(NEQUIP_ENV)
	$(NEQUIP_ENV)/bin/pip install -q --disable-pip-version-check $(TORCH)
	$(NEQUIP_ENV)/bin/pip install -q --disable-pip-version-check $(TORCH) "nequip==0.19.1" torch-geometric "sevenn==0.13.0"
	$(NEQUIP_ENV)/bin/pip install -q --disable-pip-version-check $(TORCH) -e ".[nequip,sevenn,egnn,dev]"
	touch $@

# core and e3nn-adapter tests run in both environments (e3nn 0.4.4 and 0.6)
test-mace: $(MACE_ENV)/.installed
	$(MACE_ENV)/bin/python -m pytest $(PYTEST_ARGS) tests integration_tests

test-nequip: $(NEQUIP_ENV)/.installed
	$(NEQUIP_ENV)/bin/python -m pytest $(PYTEST_ARGS) tests integration_tests

# The main job, on generated data: pretrain a small MACE on symmetric EMT clusters (float32, as MACE's foundation
# models; MACE's error table on a held-out set is printed), then fine-tune it vanilla vs MACE's own LoRA vs each
# controller, 3 seeds, on more symmetric data and on data in an external field (equirelax compare). The two
# comparisons run side by side, one thread each (2 cores): their s/epoch columns are measured that way.
DEMO_DIR := demo-output
DEMO_BIN := $(CURDIR)/$(MACE_ENV)/bin
DEMO_RUNS := vanilla lora cr ace ace-resilient recm
demo: $(MACE_ENV)/.installed
	mkdir -p $(DEMO_DIR)
	cd $(DEMO_DIR) && $(DEMO_BIN)/equirelax pretrain --host mace --out pretrained
	cd $(DEMO_DIR) && $(DEMO_BIN)/equirelax data emt sym_train.xyz --n 50 --seed 21
	cd $(DEMO_DIR) && $(DEMO_BIN)/equirelax data emt sym_test.xyz --n 40 --seed 22
	cd $(DEMO_DIR) && $(DEMO_BIN)/equirelax data emt-field field_train.xyz --n 50 --seed 11
	cd $(DEMO_DIR) && $(DEMO_BIN)/equirelax data emt-field field_test.xyz --n 40 --seed 12
	cd $(DEMO_DIR) && pids=""; for kind in symmetric field; do \
		OMP_NUM_THREADS=1 $(DEMO_BIN)/equirelax compare --host mace --config $(CURDIR)/examples/mace/finetune_$$kind.yaml \
			--controllers $(DEMO_RUNS) $$([ $$kind = field ] && echo field-input) --seeds 0 1 2 --quiet \
			--out $$kind > $$kind.log 2>&1 & pids="$$pids $$!"; done; \
		status=0; for pid in $$pids; do wait $$pid || status=1; done; \
		for kind in symmetric field; do echo; echo "== $$kind (log: $(DEMO_DIR)/$$kind.log)"; \
			sed -n '/^| run/,$$p' $$kind.log; done; exit $$status
	@echo "reports: $(DEMO_DIR)/field/report.md (external field) and $(DEMO_DIR)/symmetric/report.md (symmetric)"

# SevenNet-0 (shipped in the sevenn wheel) fine-tuned with sevenn's own training, vanilla vs each controller, on
# generated EMT clusters in a uniform field and on symmetric ones (NequIP environment, where sevenn lives).
SEVENN_DIR := sevenn-output
NEQUIP_BIN := $(CURDIR)/$(NEQUIP_ENV)/bin
sevenn-demo: $(NEQUIP_ENV)/.installed
	mkdir -p $(SEVENN_DIR)
	cd $(SEVENN_DIR) && for kind in field symmetric; do \
		data=$$([ $$kind = field ] && echo emt-field || echo emt); \
		$(NEQUIP_BIN)/equirelax data $$data $${kind}_train.xyz --n 32 --seed 31 && \
		$(NEQUIP_BIN)/equirelax data $$data $${kind}_valid.xyz --n 8 --seed 32 && \
		$(NEQUIP_BIN)/equirelax data $$data $${kind}_test.xyz --n 24 --seed 33 && \
		OMP_NUM_THREADS=2 $(NEQUIP_BIN)/equirelax compare --host sevenn --quiet \
			--config $(CURDIR)/examples/sevenn/finetune_$$kind.yaml --out $$kind || exit 1; done
	@echo "reports: $(SEVENN_DIR)/field/report.md (external field) and $(SEVENN_DIR)/symmetric/report.md (symmetric)"

benchmark: $(NEQUIP_ENV)/.installed
	$(NEQUIP_ENV)/bin/python benchmarks/e3nn_synthetic.py speed
	$(NEQUIP_ENV)/bin/python benchmarks/e3nn_synthetic.py accuracy
	$(NEQUIP_ENV)/bin/python benchmarks/nequip_speed.py
	$(NEQUIP_ENV)/bin/python benchmarks/nequip_finetune.py
	$(NEQUIP_ENV)/bin/python benchmarks/nbody.py --train 1000 --test 500 --epochs 200 --seeds 0 1 2 \
		--kinds field --sizes 250 500 1000 --threads 1 --out nbody-field & first=$$!; \
	$(NEQUIP_ENV)/bin/python benchmarks/nbody.py --train 1000 --test 500 --epochs 200 --seeds 0 1 2 \
		--kinds symmetric --threads 1 --out nbody-symmetric & second=$$!; wait $$first && wait $$second
	$(NEQUIP_ENV)/bin/python benchmarks/nbody.py --model steerable --train 500 --test 500 --epochs 120 \
		--seeds 0 1 --kinds field --threads 1 --out nbody-steerable-field & first=$$!; \
	$(NEQUIP_ENV)/bin/python benchmarks/nbody.py --model steerable --train 500 --test 500 --epochs 120 \
		--seeds 0 1 --kinds symmetric --threads 1 --out nbody-steerable-symmetric & second=$$!; \
		wait $$first && wait $$second
	$(NEQUIP_ENV)/bin/python benchmarks/nbody.py --train 3000 --test 1000 --epochs 400 --seeds 0 \
		--kinds symmetric --controllers vanilla --threads 1 --out nbody-vanilla-3000

clean:
	rm -rf $(MACE_ENV) $(NEQUIP_ENV) *.egg-info
