"""The PyTorch reference row of a stage benchmark (`ragar bench` with
`job: stage` and `bench.runner=pytorch`, e.g. configs/bench/backends.yaml):
times the same call as `ragar stage-bench` with the reference libraries on
the same weights and inputs, and writes the same result file.

  encoder-text   clip: CLIPTokenizerFast + CLIPModel.get_text_features,
                 L2-normalised; minilm: sentence-transformers' encode
  encoder-image  clip: CLIPImageProcessor + CLIPModel.get_image_features,
                 L2-normalised
  generator      diffusers' StableDiffusionPipeline (the configured
                 scheduler), guidance 7.5, one seeded generator per image
  captioner      blip / blip2: BlipProcessor + BlipForConditionalGeneration
                 (or the BLIP-2 pair, as config.json's model_type says)
                 .generate (greedy, `tokens` new tokens at most)
  keyword-llm    llama / qwen2: AutoTokenizer's chat template +
                 AutoModelForCausalLM.generate (greedy, `tokens` new
                 tokens at most), one prompt at a time as ragar's stage
                 does (a batch of prompts is a loop, no padding)

Inputs are the ones `ragar stage-bench` makes (host/src/stage_bench.rs):
the same product titles, the same seeded gradient-and-noise images. A call
includes tokenisation / preprocessing, as ragar's does. Threads: all
cores, as ragar uses.

Usage (run by `ragar bench`): python scripts/bench_reference.py REQUEST.json
"""
import json
import os
import sys
import time

import numpy as np
import torch

ADJ = ["oversized", "embroidered", "relaxed", "slim", "vintage", "pleated", "cropped", "quilted"]
COLOUR = ["navy", "burgundy", "beige", "olive", "ivory", "charcoal", "coral", "mustard"]
STUFF = ["silk", "suede", "cashmere", "denim", "linen", "wool"]
ITEM = ["sandals", "shorts", "hoodie", "blazer", "dress", "sneakers", "scarf", "cardigan"]


def texts(n):
    return [f"{ADJ[i % 8]} {COLOUR[(i // 8) % 8]} {STUFF[(i // 64) % 6]} {ITEM[(i * 7 + 3) % 8]}, "
            f"size {['XS', 'S', 'M', 'L', 'XL'][i % 5]}" for i in range(n)]


def keyword_prompts(n):
    return [f"Give three comma-separated keywords for this item: {t}" for t in texts(n)]


def images(n, size):
    from PIL import Image
    g = torch.Generator().manual_seed(7)
    s = size
    x = (np.arange(s * s) % s).astype(np.float32) / s
    y = (np.arange(s * s) // s).astype(np.float32) / s
    out = []
    for k in range(n):
        z = torch.randn(s * s, generator=g).numpy() * 20.0
        rgb = np.stack([x * 255.0 + z, y * 255.0 - z, float((k * 37) % 256) + z], axis=1)
        out.append(Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8).reshape(s, s, 3)))
    return out


def latency(seconds):
    v = np.array(seconds)
    return {"n": len(v), "mean": float(v.mean()), "p50": float(np.percentile(v, 50)),
            "p90": float(np.percentile(v, 90)), "p99": float(np.percentile(v, 99)), "max": float(v.max()),
            "per_second": float(len(v) / v.sum())}


def main(request_path):
    req = json.load(open(request_path))
    args, comp = req["args"], req["component"]
    torch.set_num_threads(os.cpu_count())
    device = "cuda" if req["device"].startswith("cuda") else "cpu"
    dtype = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}[req["dtype"]]
    stage, batch = args["stage"], args["batch"]
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    if comp == "clip":
        from transformers import CLIPImageProcessor, CLIPModel, CLIPTokenizerFast
        model = CLIPModel.from_pretrained(req["model_dir"], torch_dtype=dtype).to(device).eval()
        size = model.config.vision_config.image_size

        def pooled(o):
            return o if isinstance(o, torch.Tensor) else o.pooler_output

        if stage == "encoder-text":
            tok = CLIPTokenizerFast.from_pretrained(req["model_dir"])
            inputs = texts(batch)

            def call():
                enc = tok(inputs, padding=True, truncation=True, max_length=77, return_tensors="pt").to(device)
                with torch.no_grad():
                    return torch.nn.functional.normalize(pooled(model.get_text_features(**enc)), dim=-1).cpu()
        else:
            proc = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
            inputs = images(batch, args["size"])

            def call():
                px = proc(images=inputs, return_tensors="pt")["pixel_values"].to(device, dtype)
                with torch.no_grad():
                    return torch.nn.functional.normalize(pooled(model.get_image_features(pixel_values=px)),
                                                         dim=-1).cpu()
    elif comp == "minilm":
        from sentence_transformers import SentenceTransformer
        model = SentenceTransformer(req["model_dir"], device=device)
        if dtype != torch.float32:
            model = model.to(dtype)
        inputs = texts(batch)

        def call():
            return model.encode(inputs, batch_size=batch, convert_to_numpy=True)
    elif comp == "stable-diffusion":
        from diffusers import (DDIMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler,
                               StableDiffusionPipeline)
        pipe = StableDiffusionPipeline.from_pretrained(req["model_dir"], torch_dtype=dtype,
                                                       safety_checker=None, requires_safety_checker=False)
        kind = req["params"].get("scheduler", "dpm++")
        cls = {"ddim": DDIMScheduler, "euler-a": EulerAncestralDiscreteScheduler}.get(kind,
                                                                                      DPMSolverMultistepScheduler)
        pipe.scheduler = cls.from_config(pipe.scheduler.config)
        pipe = pipe.to(device)
        pipe.set_progress_bar_config(disable=True)
        prompts = texts(batch)

        def call():
            gens = [torch.Generator().manual_seed(i) for i in range(batch)]
            return pipe(prompts, num_inference_steps=args["steps"], guidance_scale=7.5, height=args["size"],
                        width=args["size"], generator=gens, output_type="np").images
    elif comp in ("blip", "blip2"):
        import json as js
        from transformers import (Blip2ForConditionalGeneration, Blip2Processor, BlipForConditionalGeneration,
                                  BlipProcessor)
        with open(os.path.join(req["model_dir"], "config.json")) as f:
            blip2 = js.load(f).get("model_type") == "blip-2"
        cls, pcls = ((Blip2ForConditionalGeneration, Blip2Processor) if blip2
                     else (BlipForConditionalGeneration, BlipProcessor))
        model = cls.from_pretrained(req["model_dir"], torch_dtype=dtype).to(device).eval()
        proc = pcls.from_pretrained(req["model_dir"])
        inputs = images(batch, args["size"])

        def call():
            px = proc(images=inputs, return_tensors="pt")["pixel_values"].to(device, dtype)
            with torch.no_grad():
                return model.generate(pixel_values=px, max_new_tokens=args["tokens"], num_beams=1)
    elif comp in ("llama", "qwen2"):
        from transformers import AutoModelForCausalLM, AutoTokenizer
        model = AutoModelForCausalLM.from_pretrained(req["model_dir"], dtype=dtype).to(device).eval()
        tok = AutoTokenizer.from_pretrained(req["model_dir"])
        prompts = keyword_prompts(batch)
        eos = [i for i in (tok.convert_tokens_to_ids(t) for t in
                           (tok.eos_token, "<|im_end|>", "<|eot_id|>", "<|endoftext|>") if t)
               if isinstance(i, int) and i != tok.unk_token_id]

        def call():
            out = []
            for p in prompts:
                text = tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                               add_generation_prompt=True)
                ids = tok(text, add_special_tokens=False, return_tensors="pt").input_ids.to(device)
                with torch.no_grad():
                    gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args["tokens"],
                                         do_sample=False, eos_token_id=eos, pad_token_id=eos[0])
                out.append(tok.decode(gen[0, ids.shape[1]:], skip_special_tokens=True))
            return out
    else:
        sys.exit(f"bench_reference.py: no PyTorch reference for component '{comp}'")

    for _ in range(args["warmup"]):
        call()
    sync()
    seconds = []
    # As ragar's stage-bench: at least `iters` calls and `min_time` seconds.
    while len(seconds) < args["iters"] or sum(seconds) < args.get("min_time", 0.0):
        t = time.perf_counter()
        call()
        sync()
        seconds.append(time.perf_counter() - t)
    lat = latency(seconds)
    # The weights by folder name, as ragar's rows (stage_bench::model_name): rows compare on the same weights.
    model = os.path.basename(os.path.normpath(req["model_dir"])) if req.get("model_dir") else ""
    result = {"runner": "pytorch", "stage": stage, "component": comp, "model": model, "backend": "pytorch",
              "device": req["device"], "dtype": req["dtype"], "args": args, "latency": lat,
              "items_per_s": lat["per_second"] * batch, "threads": torch.get_num_threads()}
    tmp = req["out"] + ".part"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=1)
    os.replace(tmp, req["out"])
    print(f"{stage} {comp} pytorch {req['device']} {req['dtype']} b{batch}: {result['items_per_s']:.2f} items/s, "
          f"p50 {lat['p50'] * 1e3:.1f} ms")


if __name__ == "__main__":
    main(sys.argv[1])
