# The two commands of the README: `make serve` and `make test`. Both set up .venv first.
PY := .venv/bin/python
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: serve test lint default-model default-model-2 default-model-vqvae bench bench-vq reliability bench-peers \
	bench-serving

serve:
	scripts/bootstrap.sh
	$(PY) -m service --host $(HOST) --port $(PORT)

test:
	scripts/bootstrap.sh train,test,torchscript
	scripts/install_browser.sh
	$(PY) -m ruff check .
	$(PY) -m pytest -q

lint:
	$(PY) -m ruff check .

# Reproduces models/mnist-vae/1 (about 30 min of training and 50 min of k=5000 evaluation on 2 CPU cores).
default-model:
	scripts/bootstrap.sh train
	scripts/train_default_model.sh

# Reproduces models/mnist-vae/2, the default (resumable; checkpoints in RUNS=/work/runs): phase 1 ~80 min,
# IWAE fine-tuning ~15 min, background model ~15 min, k=5000 evaluation ~50 min, export + ood-eval ~20 min
# on one core of this 2-core CPU machine.
default-model-2:
	scripts/bootstrap.sh train
	scripts/train_default_model_2.sh

# Reproduces models/mnist-vqvae/1 (resumable; RUNS=/work/runs): autoencoder ~5 min, prior ~12 min,
# k=1000 evaluation ~25 min, export + ood-eval ~5 min on one core of this 2-core CPU machine.
default-model-vqvae:
	scripts/bootstrap.sh train
	scripts/train_default_vqvae.sh

# Sampling from the VQ-VAE's prior through the real service: latency of n=64, batching of concurrent requests.
bench-vq:
	scripts/bootstrap.sh train,test,torchscript
	benchmarks/setup.sh
	$(PY) benchmarks/vq_sampling.py

# The serving benchmark against the plain FastAPI endpoint only (no peers venv needed).
bench:
	scripts/bootstrap.sh train,test,torchscript
	benchmarks/setup.sh
	$(PY) benchmarks/serving_benchmark.py --servers vae-serve,plain-w2

# Long reliability variants: the slow burst test, then every script of scripts/reliability (JSON results;
# about 50 min, the 30-minute soak last).
reliability:
	scripts/bootstrap.sh train,test,torchscript
	$(PY) -m pytest tests/reliability -q --run-slow
	$(PY) scripts/reliability/burst.py
	$(PY) scripts/reliability/soak.py
	$(PY) scripts/reliability/hostile.py
	scripts/reliability/cheap_burst.sh
	$(PY) scripts/reliability/loglik_burst.py
	$(PY) scripts/reliability/rollout.py
	$(PY) scripts/reliability/shutdown_and_pixels.py
	$(PY) scripts/reliability/kill_engine.py
	$(PY) scripts/reliability/mixed_soak.py --minutes 30

# The peers of the serving benchmark (BentoML, LitServe) in their own venv, .bench-peers-venv.
bench-peers:
	benchmarks/peers/setup.sh

# Serving benchmark: hey against this service, plain FastAPI, BentoML and LitServe, one at a time.
bench-serving: bench-peers
	scripts/bootstrap.sh train,test,torchscript
	benchmarks/setup.sh
	$(PY) benchmarks/serving_benchmark.py
