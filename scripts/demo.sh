#!/usr/bin/env bash
# The main job: `ragar demo` — RAGAR end to end on the project's open sticker
# set (ranker, reflection training, generation, Table 1 metrics, report.html)
# after setting the machine up. Arguments go to `ragar demo`, e.g.
#   bash scripts/demo.sh --test-users 12 method.retrieval.k=5
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
bash scripts/setup.sh
cargo build -p ragar-host --bin ragar
target/debug/ragar demo "$@"
