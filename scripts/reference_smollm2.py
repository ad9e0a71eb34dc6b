"""Reference outputs of SmolLM2-135M-Instruct (the real GGUF weights) from
transformers' GGUF loader, which dequantizes to fp32: token ids of prompts
rendered with the checkpoint's chat template, the 64 largest final-position logits, and a
greedy continuation. ragar's candle Llama runs the same file with quantized
matmuls, so logits are compared by cosine and top tokens, not exactly.

Usage: python scripts/reference_smollm2.py GGUF_DIR GGUF_FILE OUT.json
"""
import json
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

PROMPTS = [
    "Give three keywords for this item: red floral summer dress with puff sleeves",
    "List 3 keywords describing the movie Toy Story (1995), Animation|Children|Comedy",
]


def main(d, f, out):
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, torch_dtype=torch.float32).eval()
    rows = []
    for p in PROMPTS:
        text = tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
        ids = tok(text, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0, -1]
            gen = model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False)[0, len(ids):].tolist()
        top = torch.topk(logits, 64)
        rows.append({"prompt": p, "chat_text": text, "ids": ids,
                     "top_logits": [[int(i), round(float(v), 5)] for v, i in zip(top.values, top.indices)],
                     "greedy_ids": gen, "greedy_text": tok.decode(gen, skip_special_tokens=True)})
        print(repr(text[-80:]), "->", repr(rows[-1]["greedy_text"]))
    with open(out, "w") as fh:
        json.dump({"model": f, "rows": rows}, fh)


if __name__ == "__main__":
    main(*sys.argv[1:4])
