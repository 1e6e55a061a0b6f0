# medsynth shortcuts. `make help` lists them. Every target installs first when needed.
PYTHON        ?= python3
VENV          ?= .venv
TORCH_VERSION ?= 2.13.0
NILEARN       ?= nilearn>=0.10
BIN           := $(VENV)/bin
PY            := $(BIN)/python
STAMP         := $(VENV)/.installed-$(TORCH_VERSION)

CONFIG ?= configs/seg2d.yaml
RUN    ?= runs/seg2d
CKPT   ?= $(RUN)/checkpoints/last.ckpt
OUT    ?= $(RUN)/samples-$(shell date +%Y%m%d-%H%M%S)
ARGS   ?=
RUNS   ?= runs

DEMO_CONFIG := --config configs/seg2d.yaml --config configs/experiments/demo.yaml
DEMO_RUN    := runs/demo
DEMO_CKPT   := $(DEMO_RUN)/checkpoints/last.ckpt
AE3D_DEMO_CONFIG := --config configs/ae3d.yaml --config configs/experiments/ae3d_demo.yaml
AE3D_DEMO_RUN    := runs/ae3d_demo
AE3D_DEMO_CKPT   := $(AE3D_DEMO_RUN)/checkpoints/last.ckpt
LDM3D_DEMO_CONFIG := --config configs/biflownet3d.yaml --config configs/experiments/biflownet3d_demo.yaml
DEMO3D_RUN        := runs/demo3d
SEG3D_DEMO_CONFIG := --config configs/biflownet3d_seg.yaml --config configs/experiments/biflownet3d_seg_demo.yaml
SEG3D_JUDGE_CONFIG := --config configs/segmenter2d.yaml --config configs/experiments/segmenter3d_demo.yaml
SEG3D_RUN         := runs/demo3d_seg

.DEFAULT_GOAL := help
.PHONY: help install demo demo-ae3d demo-3d demo-3d-seg test test-all quick-test overfit fit sample export status clean lint

help: ## list the targets
	@grep -E '^[a-z0-9-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "} {printf "  make %-11s %s\n", $$1, $$2}'
	@echo "  variables: CONFIG=$(CONFIG) RUN=$(RUN) CKPT=<RUN>/checkpoints/last.ckpt OUT=<RUN>/samples-<time> ARGS='extra flags'"

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install torch==$(TORCH_VERSION)
	$(PY) -m pip install -e ".[dev]"
	$(PY) -m pip install --no-deps "$(NILEARN)"  # the demo's template files only, without pandas and scikit-learn
	touch $@

install: $(STAMP) ## create .venv: torch $(TORCH_VERSION) first, then medsynth, its dependencies and the demo's files

demo: install ## train on the shipped MNI152 brain slices (CPU, ~10 min), then sample to runs/demo/predictions
	$(BIN)/medsynth fit $(DEMO_CONFIG) $(if $(wildcard $(DEMO_CKPT)),--ckpt_path $(DEMO_CKPT)) $(ARGS)
	$(BIN)/medsynth predict $(DEMO_CONFIG) --ckpt_path $(DEMO_CKPT) --output_dir $(DEMO_RUN)/predictions --overwrite
	@echo "samples: $(DEMO_RUN)/predictions/grid.png (masks above samples), training previews: $(DEMO_RUN)/samples/"

demo-ae3d: install ## 3D: VQ autoencoder on MNI152 T1 patches (CPU, ~8 min), then reconstructs both halves as NIfTI
	$(BIN)/medsynth fit $(AE3D_DEMO_CONFIG) $(if $(wildcard $(AE3D_DEMO_CKPT)),--ckpt_path $(AE3D_DEMO_CKPT)) $(ARGS)
	$(BIN)/medsynth predict $(AE3D_DEMO_CONFIG) --ckpt_path $(AE3D_DEMO_CKPT) --output_dir $(AE3D_DEMO_RUN)/predictions --overwrite
	@echo "reconstructions: $(AE3D_DEMO_RUN)/predictions/*.nii.gz, training pictures: $(AE3D_DEMO_RUN)/reconstructions/"

demo-3d: install ## 3D chain on MNI152: autoencoder (demo-ae3d's), encode, BiFlowNet, generate NIfTI (CPU, ~15 min)
	$(if $(wildcard $(AE3D_DEMO_CKPT)),,$(BIN)/medsynth fit $(AE3D_DEMO_CONFIG))
	$(BIN)/medsynth predict --config configs/encode3d.yaml --ckpt_path $(AE3D_DEMO_CKPT) \
	  --data medsynth.data.MNI152VolumeDataModule --output_dir $(DEMO3D_RUN)/latents --overwrite
	$(BIN)/medsynth fit $(LDM3D_DEMO_CONFIG) --data.manifest $(DEMO3D_RUN)/latents/latents.json \
	  $(if $(wildcard $(DEMO3D_RUN)/ldm/checkpoints/last.ckpt),--ckpt_path $(DEMO3D_RUN)/ldm/checkpoints/last.ckpt) $(ARGS)
	$(BIN)/medsynth predict $(LDM3D_DEMO_CONFIG) --ckpt_path $(DEMO3D_RUN)/ldm/checkpoints/last.ckpt \
	  --output_dir $(DEMO3D_RUN)/generated --overwrite
	@echo "generated volumes: $(DEMO3D_RUN)/generated/samples/*.nii.gz (grid.png: orthogonal mid-slices)"

demo-3d-seg: install ## 3D mask-guided: BiFlowNet on MNI152 tissue label maps, judged by a 3D segmenter (CPU, ~9 min)
	$(if $(wildcard $(AE3D_DEMO_CKPT)),,$(BIN)/medsynth fit $(AE3D_DEMO_CONFIG))
	$(BIN)/medsynth predict --config configs/encode3d.yaml --ckpt_path $(AE3D_DEMO_CKPT) \
	  --data medsynth.data.MNI152VolumeDataModule --data.tissue_labels true --data.num_workers 1 \
	  --output_dir $(SEG3D_RUN)/latents --overwrite
	$(BIN)/medsynth fit $(SEG3D_DEMO_CONFIG) --data.manifest $(SEG3D_RUN)/latents/latents.json \
	  --trainer.default_root_dir $(SEG3D_RUN)/ldm $(ARGS)
	$(BIN)/medsynth predict $(SEG3D_DEMO_CONFIG) --ckpt_path $(SEG3D_RUN)/ldm/checkpoints/last.ckpt \
	  --data.predict_masks $(SEG3D_RUN)/latents/masks --model.guidance_scale 3 --output_dir $(SEG3D_RUN)/generated --overwrite
	$(BIN)/medsynth fit $(SEG3D_JUDGE_CONFIG) --trainer.default_root_dir $(SEG3D_RUN)/segmenter
	$(PY) scripts/seg3d_dice.py --segmenter $(SEG3D_RUN)/segmenter/checkpoints/last.ckpt --window 32 \
	  --latents $(SEG3D_RUN)/latents/latents.json \
	  --samples $(SEG3D_RUN)/generated --out $(SEG3D_RUN)/dice.json
	@echo "samples: $(SEG3D_RUN)/generated/samples/*.nii.gz beside masks/; Dice table: $(SEG3D_RUN)/dice.json"

test: install ## the default test suite (< 10 min on 2 CPU cores)
	$(PY) -m pytest -q

test-all: install ## every test, the slow ones too
	$(PY) -m pytest -q -m "slow or not slow"

quick-test: install ## 2-epoch overfit on one batch of the demo data: checks the whole loop in a minute
	$(BIN)/medsynth fit $(DEMO_CONFIG) --trainer.overfit_batches 1 --trainer.max_epochs 2 --trainer.max_steps -1 \
	  --trainer.logger false --trainer.default_root_dir runs/quick-test-$(shell date +%Y%m%d-%H%M%S) $(ARGS)

overfit: install ## overfit a few demo slices (loss should fall towards 0)
	$(BIN)/medsynth fit $(DEMO_CONFIG) --trainer.overfit_batches 1 --trainer.max_steps 300 --trainer.max_epochs -1 \
	  --trainer.check_val_every_n_epoch 50 --model.lr_warmup_steps 20 --trainer.logger false \
	  --trainer.default_root_dir runs/overfit-$(shell date +%Y%m%d-%H%M%S) $(ARGS)

fit: install ## train: make fit CONFIG=configs/seg2d.yaml RUN=runs/x ARGS='--data.img_dir ...' (resumes RUN's last.ckpt)
	$(BIN)/medsynth fit --config $(CONFIG) --trainer.default_root_dir $(RUN) \
	  $(if $(wildcard $(RUN)/checkpoints/last.ckpt),--ckpt_path $(RUN)/checkpoints/last.ckpt) $(ARGS)

sample: install ## sample: make sample CONFIG=... RUN=runs/x [CKPT=...] [OUT=...] ARGS='--data.seg_dir ...'
	$(BIN)/medsynth predict --config $(CONFIG) --ckpt_path $(CKPT) --output_dir $(OUT) $(ARGS)

export: install ## a diffusers pipeline folder: make export CONFIG=... RUN=runs/x OUT=dir [ARGS=--allow_incompatible]
	$(BIN)/medsynth export --config $(CONFIG) --ckpt_path $(CKPT) --output_dir $(OUT) $(ARGS)

status: install ## runs under RUNS=runs: step, epoch, best validation loss, latest preview; writes RUN/curves.png
	$(PY) -m medsynth.status $(RUNS)

lint: install ## ruff
	$(BIN)/ruff check medsynth tests benchmarks

clean: ## remove caches and build files (never runs/ nor .venv; delete those by hand)
	find . -name __pycache__ -prune -not -path "./$(VENV)/*" -exec rm -rf {} +
	rm -rf .pytest_cache build *.egg-info .ruff_cache
