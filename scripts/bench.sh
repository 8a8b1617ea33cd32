#!/usr/bin/env bash
# The main job: the agreement and speed report on whatever device is present. Extra args go to bench.
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh" bench
exec .venv/bin/python -m bench "$@"
