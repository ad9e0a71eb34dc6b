"""Full-size architectures with random weights, for the benchmark rows
that time real-size compute rather than per-op overhead (the test
checkpoints are tiny): made here from transformers' own configs, seeded,
in the HF layout, with the ONNX / TorchScript exports the ort and tch
backends read. Nothing is downloaded.

  CACHE/bench/clip-vit-b32-random   CLIPConfig() = ViT-B/32: text 12 x 512,
                                    vision 12 x 768 at 224 px / 32 px
                                    patches, 512-d projections (151 M
                                    parameters; ~1.8 GB with the exports)

The real tokenizer (CACHE/models/clip-tokenizer, made by scripts/setup.sh)
is linked in. Real checkpoints need none of this: download one and run
scripts/export_clip.py on it.

Usage: python scripts/make_bench_models.py CACHE   (scripts/setup.sh --bench)
"""
import os
import sys

import torch
from transformers import CLIPConfig, CLIPModel

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import export_clip  # noqa: E402


def clip_b32(cache):
    """The ViT-B/32 folder (made if missing); returns its path."""
    out = os.path.join(cache, "bench", "clip-vit-b32-random")
    if not os.path.exists(os.path.join(out, "model.safetensors")):
        torch.manual_seed(0)
        part = out + ".part"
        CLIPModel(CLIPConfig()).save_pretrained(part, safe_serialization=True)
        tok = os.path.abspath(os.path.join(cache, "models", "clip-tokenizer"))
        for f in os.listdir(tok):
            os.symlink(os.path.join(tok, f), os.path.join(part, f))
        os.replace(part, out)
    return out


if __name__ == "__main__":
    export_clip.main(clip_b32(sys.argv[1]), "f32")
