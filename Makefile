# Two entry points: `make demo` and `make test`. Both create the virtualenv first.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.semifer-installed

.PHONY: demo test install clean-venv browser

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch/torchvision first, pinned: pip finds these exact builds on local disk.
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e ".[test]"
	# MTCNN face detector (weights inside the wheel). Its metadata pins torch<2.3, which its code
	# does not need (tests/test_faces.py runs it on this torch): installed without dependencies.
	$(PY) -m pip install -q --no-deps facenet-pytorch==2.6.0
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/semifer demo --out runs/demo

# Headless Chromium for the web app's browser test (tests/test_serve.py): Debian's packages,
# installed only where missing and where apt-get can run (root); elsewhere that test skips and says why.
browser:
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "make: installing chromium and chromium-driver (apt-get) for the web app's browser test"; \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; } \
	    || echo "make: apt-get could not install chromium: the browser test will be skipped"; \
	else echo "make: no chromium and no root apt-get here: the browser test will be skipped"; fi

test: $(STAMP) browser
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q

clean-venv:
	rm -rf $(VENV)
