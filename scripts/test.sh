#!/usr/bin/env bash
# The test command: set up the project cache (idempotent), then run every
# test of the workspace. Works on a fresh machine with the registries only.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
bash scripts/setup.sh
cargo test --workspace "$@"
# ort's CUDA provider code (a feature the workspace build leaves off): on
# this CPU-only ONNX Runtime, `cuda:0` must fail rather than run on the CPU.
cargo test -p ragar-ort --features cuda --lib "$@"
