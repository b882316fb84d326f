#!/usr/bin/env bash
# Install LoRA Studio with its test extra and run the whole test suite (README: "Run the tests").
set -euo pipefail
cd "$(dirname "$0")/.."
# torch first: keep an installed build (CUDA on a GPU machine); otherwise the CPU build the CI machine has.
python -c "import torch" 2>/dev/null || python -m pip install -q torch==2.13.0
python -m pip install -q -e ".[test]"
set +e
python -m pytest -q "$@"
status=$?
set -e
if [ "$status" -eq 5 ]; then
  echo "pytest collected no tests: that is a failure" >&2
  exit 1
fi
exit "$status"
