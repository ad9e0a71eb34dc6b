#!/usr/bin/env bash
# The main job for now: embed real product/movie/sticker texts with the real
# all-MiniLM-L6-v2 weights on candle, ONNX Runtime and libtorch — the same
# binary, the backend switched by one override — and compare the results;
# then extract keywords (Eq. 6) with the real SmolLM2-135M-Instruct GGUF.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
bash scripts/setup.sh
cargo build -p ragar-host --bin ragar
OUT=runs/encoder-demo
mkdir -p "$OUT"
for b in candle ort tch; do
  target/debug/ragar stage encoder --config configs/minilm.yaml encoder.backend=$b \
    --text-file tests/fixtures/sentences.txt --out "$OUT/$b.json"
done
python3 - "$OUT" <<'PY'
import json, math, sys
out = sys.argv[1]
texts = open("tests/fixtures/sentences.txt", encoding="utf-8").read().split("\n")[:3]
emb = {b: json.load(open(f"{out}/{b}.json")) for b in ["candle", "ort", "tch"]}
cos = lambda a, b: sum(x * y for x, y in zip(a, b)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))
print("cosine between texts (candle):")
for i in range(3):
    for j in range(i + 1, 3):
        print(f"  {cos(emb['candle'][i], emb['candle'][j]):.3f}  {texts[i]!r} vs {texts[j]!r}")
for b in ["ort", "tch"]:
    worst = min(cos(x, y) for x, y in zip(emb["candle"], emb[b]))
    print(f"candle vs {b}: lowest cosine over {len(emb[b])} texts = {worst:.7f}")
PY
printf '%s\n' \
  "Give three comma-separated keywords for this item: red floral summer dress with puff sleeves" \
  "Give three comma-separated keywords for this movie: Toy Story (1995), Animation|Children|Comedy" \
  > "$OUT/prompts.txt"
target/debug/ragar stage keyword-llm --config configs/components/smollm2.yaml \
  --text-file "$OUT/prompts.txt" --out "$OUT/keywords.json" --max-tokens 24 --stop "<|im_end|>"
python3 -c 'import json,sys; [print("keywords:", repr(r["text"])) for r in json.load(open(sys.argv[1]))]' "$OUT/keywords.json"
echo "outputs in $OUT/ (SmolLM2-135M is a tiny model: point configs/components/smollm2.yaml at a larger Llama/Qwen2 GGUF for better keywords)"
