"""Stable Diffusion denoising speed, ragar (candle) vs diffusers, side by side
in one run on the same random weights of the SD 1.5 architecture (UNet
860M parameters, CLIP ViT-L/14 text tower, the SD VAE), float32, CPU, the
same number of threads (2 by default).

Figure: seconds per denoising step at 512 x 512 with classifier-free
guidance (one UNet call on a batch of 2, plus the sampler), taken as a user
runs it: rate = (t(steps_long) - t(steps_short)) / (steps_long - steps_short),
which removes loading, prompt encoding and the VAE decode from both sides.
Sampler: DDIM for both.

Usage: cargo build -p ragar-host --bin ragar && \
       .ragar/venv/bin/python scripts/bench_sd.py
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
PROMPT = "a red floral summer dress on a wooden hanger, studio photo"


def build(out):
    """A random-weight pipeline with SD 1.5's architecture (scripts/make_bench_models.py)."""
    import sys
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    from make_bench_models import sd15
    sd15(out, os.path.join(CACHE, "models/clip-tokenizer"))


def timed(cmd):
    t = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
    return time.perf_counter() - t


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ragar", default=os.path.join(ROOT, "target", "debug", "ragar"))
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--steps", type=int, nargs=2, default=[1, 3])
    ap.add_argument("--json")
    a = ap.parse_args()
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    mdir = os.path.join(CACHE, "bench/sd15-random")
    build(mdir)
    short, long_ = a.steps

    d = tempfile.mkdtemp()
    with open(os.path.join(d, "p.txt"), "w") as f:
        f.write(PROMPT + "\n")

    def ours(steps):
        return timed([a.ragar, "stage", "generator", "--config", "configs/components/sd15.yaml",
                      f"generator.params.model_dir={mdir}", "generator.params.scheduler=ddim",
                      "--text-file", os.path.join(d, "p.txt"), "--out", os.path.join(d, "img"),
                      "--steps", str(steps), "--width", str(a.size), "--height", str(a.size)])

    ragar_step = (ours(long_) - ours(short)) / (long_ - short)

    from diffusers import StableDiffusionPipeline
    pipe = StableDiffusionPipeline.from_pretrained(mdir, safety_checker=None, feature_extractor=None,
                                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)

    def ref(steps):
        t = time.perf_counter()
        with torch.no_grad():
            pipe(PROMPT, num_inference_steps=steps, guidance_scale=7.5, height=a.size, width=a.size,
                 generator=torch.Generator().manual_seed(0))
        return time.perf_counter() - t

    ref_step = (ref(long_) - ref(short)) / (long_ - short)
    print("| SD 1.5 architecture, fp32 CPU | ragar (candle) | diffusers | ratio (speed) |")
    print("|---|---:|---:|---:|")
    print(f"| seconds per denoising step, {a.size} px, CFG (UNet batch 2) | {ragar_step:.2f} | {ref_step:.2f} | "
          f"{ref_step / ragar_step:.2f}x |")
    if a.json:
        json.dump({"sd_step_seconds": [ragar_step, ref_step], "size": a.size}, open(a.json, "w"))


if __name__ == "__main__":
    main()
