"""Full-size architectures with random weights, for the benchmark rows
that time real-size compute rather than per-op overhead (the test
checkpoints are tiny): made here from transformers' own configs, seeded,
in the HF layout, with the ONNX / TorchScript exports the ort and tch
backends read. Nothing is downloaded.

  CACHE/bench/clip-vit-b32-random   CLIPConfig() = ViT-B/32: text 12 x 512,
                                    vision 12 x 768 at 224 px / 32 px
                                    patches, 512-d projections (151 M
                                    parameters; ~1.8 GB with the exports)
  CACHE/bench/blip-base-random      Salesforce/blip-image-captioning-base's
                                    architecture: ViT-B/16 at 384 px, a 12 x 768
                                    BERT text decoder with cross-attention, BLIP's
                                    real tokenizer (224 M parameters; ~2.7 GB with
                                    the exports)

With --gpu, the H100 targets' architectures instead (configs/bench/gpu.yaml),
with f16 TorchScript exports (tch on CUDA; no ONNX: ort's CUDA provider is
unverified):

  CACHE/bench/clip-vit-l14-random   CLIP ViT-L/14 (openai/clip-vit-large-patch14's
                                    config: text 12 x 768, vision 24 x 1024 at
                                    224 px / 14 px patches, 768-d projections;
                                    428 M parameters)
  CACHE/bench/sd15-random           Stable Diffusion 1.5's architecture (UNet
                                    860 M parameters, CLIP ViT-L/14 text tower,
                                    the SD VAE) in diffusers' layout

The real tokenizers (CACHE/models/clip-tokenizer; BLIP's from the
all-MiniLM-L6-v2 vocabulary, as scripts/fixtures/make_blip.py builds it) go
in. Real checkpoints need none of this: download one and run
scripts/export_clip.py / export_blip.py on it.

Usage: python scripts/make_bench_models.py CACHE [clip-b32|blip-base|--gpu]   (scripts/setup.sh --bench;
       without a name, clip-b32)
"""
import os
import shutil
import sys

import torch
from transformers import CLIPConfig, CLIPModel

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import export_clip  # noqa: E402


def clip(cache, name, config):
    """A random-weight CLIP folder (made if missing) with the real tokenizer linked in; returns its path."""
    out = os.path.join(cache, "bench", name)
    if not os.path.exists(os.path.join(out, "model.safetensors")):
        torch.manual_seed(0)
        part = out + ".part"
        shutil.rmtree(part, ignore_errors=True)
        CLIPModel(config).save_pretrained(part, safe_serialization=True)
        tok = os.path.abspath(os.path.join(cache, "models", "clip-tokenizer"))
        for f in os.listdir(tok):
            os.symlink(os.path.join(tok, f), os.path.join(part, f))
        os.replace(part, out)
    return out


def blip_base(cache):
    """A random-weight BLIP captioner with blip-image-captioning-base's
    architecture and processor (384 px, CLIP mean / std), made if missing;
    returns its path. Weights are transformers' own initialization (normal,
    std 0.02), seeded."""
    from transformers import BlipConfig, BlipForConditionalGeneration, BlipImageProcessor, BlipProcessor

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures"))
    from make_blip import blip_tokenizer

    out = os.path.join(cache, "bench", "blip-base-random")
    if os.path.exists(os.path.join(out, "model.safetensors")):
        return out
    config = BlipConfig(
        text_config=dict(vocab_size=30524, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                         num_attention_heads=12, encoder_hidden_size=768, max_position_embeddings=512,
                         bos_token_id=30522, sep_token_id=102, pad_token_id=0, eos_token_id=2),
        vision_config=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                           image_size=384, patch_size=16),
    )
    torch.manual_seed(0)
    part = out + ".part"
    shutil.rmtree(part, ignore_errors=True)
    BlipForConditionalGeneration(config).eval().save_pretrained(part, safe_serialization=True)
    tok = blip_tokenizer(os.path.join(cache, "models", "all-MiniLM-L6-v2"))
    BlipProcessor(image_processor=BlipImageProcessor(size={"height": 384, "width": 384}), tokenizer=tok) \
        .save_pretrained(part)
    os.replace(part, out)
    return out


def vit_l14():
    """openai/clip-vit-large-patch14's architecture."""
    return CLIPConfig(
        text_config=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12),
        vision_config=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                           patch_size=14, image_size=224),
        projection_dim=768)


def sd15(out, tokenizer_dir):
    """A random-weight pipeline with SD 1.5's architecture, saved as diffusers does (made if missing)."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    if os.path.exists(os.path.join(out, "model_index.json")):
        return out
    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8)
    vae = AutoencoderKL(
        block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4, sample_size=512,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    )
    te = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                      num_attention_heads=12, projection_dim=768, hidden_act="quick_gelu"))
    tok = CLIPTokenizer(vocab=os.path.join(tokenizer_dir, "vocab.json"),
                        merges=os.path.join(tokenizer_dir, "merges.txt"),
                        bos_token="<|startoftext|>", eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                        unk_token="<|endoftext|>", model_max_length=77)
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
                          clip_sample=False, set_alpha_to_one=False)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=tok, unet=unet, scheduler=sched,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    tmp = out + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(tmp, safe_serialization=True)
    os.replace(tmp, out)
    return out


if __name__ == "__main__":
    cache = sys.argv[1]
    if sys.argv[2:] == ["--gpu"]:
        import export_sd
        l14 = clip(cache, "clip-vit-l14-random", vit_l14())
        sd = sd15(os.path.join(cache, "bench", "sd15-random"), os.path.join(cache, "models", "clip-tokenizer"))
        # The GPU rows run f16 (candle converts the f32 safetensors itself).
        export_clip.main(l14, "f16", onnx=False)
        export_sd.main(sd, "f16", onnx=False)
    elif sys.argv[2:] == ["blip-base"]:
        import export_blip
        export_blip.main(blip_base(cache), "f32")
    elif sys.argv[2:] in ([], ["clip-b32"]):
        export_clip.main(clip(cache, "clip-vit-b32-random", CLIPConfig()), "f32")
    else:
        sys.exit("usage: python scripts/make_bench_models.py CACHE [clip-b32|blip-base|--gpu]")
