"""Speed-up of `ragar run` from the stage-output cache: the same users, once
with an empty cache (every item captioned, encoded and keyworded: what a
run without the cache does) and once with the cache filled by the first run.

Dataset: 24 pattern images with titles, 30 users x 8 history items drawn from
them (items recur across users, as in POG/MovieLens). Models: the test
models (tiny BLIP, tiny CLIP, the real SmolLM2-135M GGUF, tiny SD at 64 px,
2 steps), CPU. Both runs write a timing.json; the per-stage table is printed.

Usage: cargo build -p ragar-host --bin ragar && .ragar/venv/bin/python scripts/bench_cache.py
"""
import json
import os
import random
import subprocess
import tempfile
import time

from PIL import Image, ImageDraw

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE = os.environ.get("RAGAR_CACHE", os.path.join(ROOT, ".ragar"))
COLOURS = {"red": (220, 40, 40), "blue": (40, 60, 220), "green": (40, 180, 60), "yellow": (230, 210, 40),
           "purple": (130, 50, 160), "black": (20, 20, 20)}
SHAPES = ["stripes", "dots", "square", "circle"]


def dataset(d):
    os.makedirs(os.path.join(d, "images"))
    ids = []
    with open(os.path.join(d, "items.jsonl"), "w") as f:
        for c, rgb in COLOURS.items():
            for s in SHAPES:
                im = Image.new("RGB", (96, 80), (250, 250, 245))
                dr = ImageDraw.Draw(im)
                if s == "stripes":
                    for x in range(0, 96, 12):
                        dr.rectangle([x, 0, x + 5, 80], fill=rgb)
                elif s == "dots":
                    for x in range(4, 96, 16):
                        for y in range(4, 80, 16):
                            dr.ellipse([x, y, x + 7, y + 7], fill=rgb)
                elif s == "square":
                    dr.rectangle([24, 16, 72, 64], fill=rgb)
                else:
                    dr.ellipse([24, 16, 72, 64], fill=rgb)
                i = f"{c}-{s}"
                im.save(os.path.join(d, "images", f"{i}.png"))
                ids.append(i)
                f.write(json.dumps({"id": i, "image": f"images/{i}.png", "text": f"a {c} {s} pattern"}) + "\n")
    rng = random.Random(0)
    with open(os.path.join(d, "users.jsonl"), "w") as f:
        for u in range(30):
            items = rng.sample(ids, 9)
            f.write(json.dumps({"user": f"u{u}", "history": items[:8], "reference": items[8]}) + "\n")


def config(d):
    p = os.path.join(d, "ragar.yaml")
    m = lambda n: os.path.join(CACHE, "models", n)  # noqa: E731
    with open(p, "w") as f:
        f.write(f"""stage_cache: store.redb
dataset: {{items: data/items.jsonl, users: data/users.jsonl, valid: 0.0, test: 0.0}}
captioner: {{name: blip, backend: candle, params: {{model_dir: {m('blip-tiny')}}}}}
encoder: {{name: clip, backend: candle, params: {{model_dir: {m('clip-tiny-e2e')}}}}}
keyword_llm: {{name: llama, backend: candle, params: {{model_dir: {m('smollm2-135m-instruct')}, gguf: SmolLM2-135M-Instruct.Q4_1.gguf, n_img_tokens: 4}}}}
mapper: {{name: ragar, backend: candle, params: {{input_dim: 576, n_img_tokens: 4, keyword_dim: 16, retrieval_dim: 16, semantic_dim: 16, hidden_dim: 16, layers: 1, heads: 2, ffn_dim: 32, n_queries: 77, output_dim: 32, calibrator_heads: 2, keyword_tokens: 2}}}}
generator: {{name: stable-diffusion, backend: candle, params: {{model_dir: {m('sd-tiny')}, scheduler: ddim}}}}
method:
  caption_max_tokens: 8
  caption_beams: 1
  keyword_max_tokens: 16
  generation: {{steps: 2, guidance: 3.0, width: 64, height: 64}}
""")
    return p


def main():
    ragar = os.path.join(ROOT, "target", "debug", "ragar")
    d = tempfile.mkdtemp()
    dataset(os.path.join(d, "data"))
    cfg = config(d)
    times = {}
    for name in ("cold", "warm"):
        t = time.perf_counter()
        subprocess.run([ragar, "run", cfg, "--out", os.path.join(d, name), "--split", "all"], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT, env={**os.environ, "RAYON_NUM_THREADS": "2"})
        times[name] = time.perf_counter() - t
        timing = json.load(open(os.path.join(d, name, "timing.json")))
        print(name, {k: round(v["seconds"], 2) for k, v in timing.items()})
    print(f"ragar run, 30 users x 8 history items over 24 items: empty cache {times['cold']:.1f} s, "
          f"filled cache {times['warm']:.1f} s, speed-up {times['cold'] / times['warm']:.2f}x")


if __name__ == "__main__":
    main()
