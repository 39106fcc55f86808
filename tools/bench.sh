#!/usr/bin/env bash
# The main job: builds flashattn and runs flashattn-bench on its default problem (on the GPU
# when one is usable, else the CPU). Arguments go to flashattn-bench (try --help).
set -euo pipefail
cd "$(dirname "$0")/.."
tools/build.sh >&2
exec build/apps/flashattn-bench "$@"
