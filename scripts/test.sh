#!/usr/bin/env bash
# The test suite: on a CPU through Triton's interpreter, on a GPU compiled. Extra args go to pytest.
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh" test
exec .venv/bin/python -m pytest tests -n "${PYTEST_WORKERS:-auto}" -p no:benchmark "$@"
