# The two set-up commands of the README: `make demo` and `make test`. Each creates .venv if it
# is absent, installs torch first (override TORCH_SPEC for a CUDA build), then ct-factory.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
DEMO_OUT ?= demo-out
BIN := $(VENV)/bin
STAMP := $(VENV)/.ct-factory-installed

.PHONY: demo demo-model demo-classifier test lint format install browser niivue clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --disable-pip-version-check -q "$(TORCH_SPEC)"
	$(BIN)/pip install --disable-pip-version-check -q -e ".[test]"
	@touch $@

demo: $(STAMP)
	$(BIN)/ctfactory phantom --n 16 --size 64 --seed 0 --out $(DEMO_OUT)/phantom --preview --overwrite
	$(BIN)/ctfactory plan cohorts/demo.yaml --out $(DEMO_OUT)/demo-plan.parquet --plot $(DEMO_OUT)/demo-plan.png
	$(BIN)/ctfactory generate cohorts/demo.yaml --out $(DEMO_OUT)/cohort
	$(BIN)/ctfactory check $(DEMO_OUT)/cohort
	$(BIN)/ctfactory eval $(DEMO_OUT)/cohort --reference $(DEMO_OUT)/phantom --split train
	$(BIN)/ctfactory report $(DEMO_OUT)/cohort
	@echo "demo: the cohort (Zarr + Parquet manifest) is in $(DEMO_OUT)/cohort; its QC report,"
	@echo "      $(DEMO_OUT)/cohort/report/report.html, holds the metrics against the phantoms in"
	@echo "      $(DEMO_OUT)/phantom (docs/evaluation.md); its plan in $(DEMO_OUT)/demo-plan.png"

# builtin:demo from scratch on CPU (about 2 hours on 2 cores with the classifier; docs/training.md): phantom data,
# then the VAE, the 3D CLIP and latent diffusion, each exported; the last step measures the
# model, draws its prompt-pair pictures and writes it to factory/models/builtin/demo.
DEMO_BUILD ?= build
demo-model: $(STAMP)
	$(BIN)/ctfactory phantom --n 192 --size 64 --seed 7 --out $(DEMO_BUILD)/demo-data --overwrite
	$(BIN)/ctfactory phantom --n 32 --size 64 --seed 8 --split valid --out $(DEMO_BUILD)/demo-data --overwrite
	# Large findings are rare at reference prevalence (2-4%): add 48 volumes with each.
	for f in effusion cardiomegaly emphysema consolidation; do \
	  $(BIN)/ctfactory phantom --n 48 --size 64 --seed 9 --finding $$f --split $$f \
	    --out $(DEMO_BUILD)/demo-data --overwrite || exit 1; done
	rm -rf $(DEMO_BUILD)/demo-runs $(DEMO_BUILD)/demo-data/latents
	$(BIN)/ctfactory train vae --config train/configs/demo-vae.yaml --plot
	$(BIN)/ctfactory export-model $(DEMO_BUILD)/demo-runs/demo-vae --out $(DEMO_BUILD)/demo-vae
	$(BIN)/ctfactory train clip --config train/configs/demo-clip.yaml --plot
	$(BIN)/ctfactory export-model $(DEMO_BUILD)/demo-runs/demo-clip --out $(DEMO_BUILD)/demo-clip
	$(BIN)/ctfactory train diffusion --config train/configs/demo-diffusion.yaml --plot
	# A second cosine cycle of 4,000 steps (a warm restart of the same run): the first cycle
	# learns effusion and cardiomegaly, the second consolidation (docs/benchmarks.md).
	$(BIN)/ctfactory train diffusion --config train/configs/demo-diffusion.yaml --plot --resume --steps 8000
	$(BIN)/ctfactory export-model $(DEMO_BUILD)/demo-runs/demo-diffusion --out $(DEMO_BUILD)/demo-model --name demo
	$(BIN)/ctfactory card $(DEMO_BUILD)/demo-model --data $(DEMO_BUILD)/demo-data \
	  --out factory/models/builtin/demo --docs-images docs/images/models
	$(MAKE) demo-classifier

# builtin:demo-classifier, the finding classifier of `ctfactory eval` and of cohort verification,
# on the same phantom data (about 8 minutes on 2 cores); held-out phantoms with each large
# finding give its per-finding AUC, recorded in its model card.
demo-classifier: $(STAMP)
	test -d $(DEMO_BUILD)/demo-data/train || { echo "run make demo-model first (its data)"; exit 2; }
	for f in effusion cardiomegaly emphysema consolidation; do \
	  $(BIN)/ctfactory phantom --n 16 --size 64 --seed 10 --finding $$f --split valid$$f \
	    --out $(DEMO_BUILD)/demo-data --overwrite || exit 1; done
	rm -rf $(DEMO_BUILD)/demo-runs/demo-classifier
	$(BIN)/ctfactory train classifier --config train/configs/demo-classifier.yaml --plot
	rm -rf factory/models/builtin/demo-classifier
	$(BIN)/ctfactory export-model $(DEMO_BUILD)/demo-runs/demo-classifier \
	  --out factory/models/builtin/demo-classifier --name demo-classifier \
	  --description "A phantom-trained demonstration finding classifier: the tiny config's 3D \
	residual CNN, one logit per CT-RATE finding, trained on CPU by make demo-classifier on the \
	phantoms builtin:demo learned from. It scores cohorts for ctfactory eval and checks volumes \
	for a cohort spec's verify block. The metrics are AUCs on held-out phantoms." \
	  --limitations "Trained and scored on procedural phantoms only, at 64^3 voxels of about \
	6 mm: findings the phantom draws large (pleural and pericardial effusion, cardiomegaly, \
	atelectasis) are recognised well, small ones (nodules, calcifications, airway walls) near \
	chance. Its AUCs bound what any factual-correctness number it produces can mean. Not a \
	model of real CT; never for clinical use."

lint: $(STAMP)
	$(BIN)/ruff check --no-cache .
	$(BIN)/ruff format --no-cache --check .
	$(BIN)/lint-imports --no-cache

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# The web page test drives Debian's Chromium through its ChromeDriver.
BROWSER = /usr/bin/chromium /usr/bin/chromedriver
browser: $(BROWSER)
$(BROWSER):
	@if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	$$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
	  $$SUDO apt-get install -y -qq --no-install-recommends chromium chromium-driver

# NiiVue, the 3D viewer of `ctfactory view` and of the serve page: one prebuilt browser bundle
# from the npm registry at a pinned version, committed (CI has no npm) with its sha256, NiiVue's
# licence and the licences of the packages bundled into it. `make niivue` refreshes it; change
# NIIVUE_VERSION to move to another release, then run the viewer tests.
NIIVUE_VERSION ?= 0.69.0
NIIVUE_DIR := factory/viewer/static
NIIVUE_NPM := build/niivue/node_modules
niivue:
	rm -rf build/niivue
	npm install --prefix build/niivue --no-save --ignore-scripts --no-audit --no-fund \
	  @niivue/niivue@$(NIIVUE_VERSION)
	@licence=$$(node -p "require('./$(NIIVUE_NPM)/@niivue/niivue/package.json').license"); \
	test "$$licence" = BSD-2-Clause || { echo "NiiVue's licence is now $$licence:" \
	  "review it and $(NIIVUE_DIR)/LICENSE.niivue before vendoring"; exit 1; }
	cp $(NIIVUE_NPM)/@niivue/niivue/dist/niivue.umd.js $(NIIVUE_DIR)/niivue.umd.js
	cd $(NIIVUE_DIR) && sha256sum niivue.umd.js > niivue.umd.js.sha256
	@{ echo "niivue.umd.js is NiiVue $(NIIVUE_VERSION) (npm @niivue/niivue, BSD-2-Clause, see"; \
	  echo "LICENSE.niivue), its dist/niivue.umd.js as published; sha256 in niivue.umd.js.sha256."; \
	  echo "It bundles these packages (NiiVue's build metafile), whose licences follow."; \
	  for pkg in $$(node -e 'const m = require(process.argv[1]); const s = new Set(); \
	    for (const k of Object.keys(m.inputs)) { const p = k.split("node_modules/"); \
	    if (p.length < 2) continue; const a = p.pop().split("/"); \
	    s.add(a[0].startsWith("@") ? a[0] + "/" + a[1] : a[0]); } \
	    console.log([...s].sort().join("\n"))' \
	    ./$(NIIVUE_NPM)/@niivue/niivue/dist/metafile-esm.json); do \
	    dir=$(NIIVUE_NPM)/$$pkg; \
	    echo; echo "==== $$pkg $$(node -p "const p = require('./$$dir/package.json'); \
	      p.version + ' (' + p.license + ')'")"; \
	    cat $$(ls -d $$dir/* | grep -i '/licen[cs]e[^/]*$$' | head -1) || exit 1; \
	  done; } > $(NIIVUE_DIR)/NOTICE.niivue
	@echo "vendored NiiVue $(NIIVUE_VERSION): $$(cat $(NIIVUE_DIR)/niivue.umd.js.sha256)"

test: lint $(BROWSER)
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) $(DEMO_OUT) .pytest_cache .ruff_cache .hypothesis
