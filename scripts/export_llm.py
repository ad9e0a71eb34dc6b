"""Export an HF causal LM folder (Llama, Qwen2, SmolLM2, ... as
transformers' AutoModelForCausalLM loads it) to the graphs ragar's ort and
tch KeywordLLMs read, next to its weights:

  model.{onnx,ts}          the decoder with a key/value cache, in Optimum's
                           "text-generation-with-past" names:
                           input_ids [b, t] int64, attention_mask [b, p + t]
                           int64, position_ids [b, t] int64,
                           past_key_values.{i}.{key,value} [b, kv_heads, p, head_dim]
                           -> logits [b, 1, vocab] (the last position's only:
                           transformers' logits_to_keep=1, all generation
                           needs; ragar also reads Optimum's [b, t, vocab]),
                           present.{i}.{key,value} [b, kv_heads, p + t, head_dim]
                           (p = 0 for the prompt: empty past tensors)
  hidden_states.{onnx,ts}  Eq. 7: input_ids [1, t] int64, img_embeddings
                           [n, hidden] f32 (the [IMG] rows, appended after
                           the prompt's token embeddings)
                           -> hidden_states [1, t + n, hidden] (after the
                           final norm)

`--dtype f16` (or bf16) writes half-precision TorchScript modules instead
(model.f16.ts, hidden_states.f16.ts: the cache, the [IMG] rows and the
outputs in f16), which the tch backend reads for `dtype: f16`; ONNX exports
stay f32.

Tokenizer, chat template, sampling and the default [IMG] rows stay in
ragar (ragar_core::llm), shared with candle. Checked against transformers
at other lengths: a prompt fed through each export's cache in three pieces
(the first on an empty cache) against one uncached pass.

Usage: python scripts/export_llm.py MODEL_DIR [--dtype f32|f16|bf16]
"""
import os
import sys

import torch
from transformers import AutoModelForCausalLM

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from ragar_export import (HALF_LIMIT, cache_of, cache_out, command_line, export, flat_of, kv_names,  # noqa: E402
                          relative, runners, with_cache)


class Decoder(torch.nn.Module):
    """One decoding call: new tokens on top of a flat list of past tensors."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.layers = model.config.num_hidden_layers

    def forward(self, input_ids, attention_mask, position_ids, *past):
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         use_cache=True, logits_to_keep=1, return_dict=True,
                         **with_cache(self.model.forward, cache_of(past, self.layers, self.model.config)))
        return (out.logits, *flat_of(cache_out(out), self.layers))


class Hidden(torch.nn.Module):
    """Final hidden states of the prompt's tokens followed by the [IMG] rows."""

    def __init__(self, model):
        super().__init__()
        # The base model without the LM head: a traced module keeps every
        # parameter of the submodules it holds (an untied head is 0.5 B of
        # Llama-3-8B's).
        self.base = model.model

    def forward(self, input_ids, img_embeddings):
        emb = self.base.get_input_embeddings()(input_ids)
        x = torch.cat([emb, img_embeddings.to(emb.dtype).unsqueeze(0)], dim=1)
        return self.base(inputs_embeds=x, return_dict=True).last_hidden_state


def load_model(root):
    """The causal LM in `root` as the exports trace it: eager attention, f32, eval mode."""
    return AutoModelForCausalLM.from_pretrained(root, attn_implementation="eager", dtype=torch.float32).eval()


def cache_shape(cfg):
    """(key / value heads, head dim) of a cache tensor [batch, heads, length, head_dim]."""
    heads = cfg.num_attention_heads
    return cfg.num_key_value_heads or heads, getattr(cfg, "head_dim", None) or cfg.hidden_size // heads


def decoder_graph(model, g):
    """The cached decoder as the export writes it: (module, example inputs,
    input names, output names, dynamic axes); `g` draws the example."""
    cfg = model.config
    (kv, hd), layers = cache_shape(cfg), cfg.num_hidden_layers
    past, present = kv_names(layers, "past_key_values"), kv_names(layers, "present")
    axes = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "total_sequence"},
            "position_ids": {0: "batch", 1: "sequence"}, "logits": {0: "batch"}}
    axes.update({n: {0: "batch", 2: "past_sequence"} for n in past})
    axes.update({n: {0: "batch", 2: "total_sequence"} for n in present})
    example = (torch.randint(0, cfg.vocab_size, (1, 3), generator=g), torch.ones(1, 7, dtype=torch.long),
               torch.arange(4, 7).unsqueeze(0), *[torch.randn(1, kv, 4, hd, generator=g) for _ in past])
    return (Decoder(model).eval(), example, ["input_ids", "attention_mask", "position_ids"] + past,
            ["logits"] + present, axes)


def main(root, dtype):
    torch.manual_seed(0)
    model = load_model(root)
    cfg = model.config
    kv, hd = cache_shape(cfg)
    hidden = Hidden(model).eval()
    g = torch.Generator().manual_seed(1)
    decoder, example, names, outs, axes = decoder_graph(model, g)
    past = names[3:]
    export(root, "model", decoder, example, names, outs, axes, dtype)
    export(root, "hidden_states", hidden,
           (torch.randint(0, cfg.vocab_size, (1, 5), generator=g), torch.randn(3, cfg.hidden_size, generator=g)),
           ["input_ids", "img_embeddings"], ["hidden_states"],
           {"input_ids": {1: "sequence"}, "img_embeddings": {0: "img_tokens"}, "hidden_states": {1: "total_sequence"}},
           dtype)

    # Check: a 10-token prompt fed as 6 + 1 + 3 tokens through each export's
    # cache (each piece's last logits), and Eq. 7's hidden states, against
    # uncached transformers passes in f32: within 1e-5 (f32), HALF_LIMIT (half).
    ids = torch.randint(0, cfg.vocab_size, (1, 10), generator=g)
    img = torch.randn(8, cfg.hidden_size, generator=g)
    with torch.no_grad():
        want = model(input_ids=ids, return_dict=True).logits[:, [5, 6, 9]]
        want_h = hidden(ids, img)
    for label, run in runners(root, ["model", "hidden_states"], dtype):
        cache = [torch.zeros(1, kv, 0, hd) for _ in past]
        pieces = []
        for a, b in [(0, 6), (6, 7), (7, 10)]:
            out = run("model", ids[:, a:b], torch.ones(1, b, dtype=torch.long), torch.arange(a, b).unsqueeze(0),
                      *cache)
            pieces.append(out[0])
            cache = out[1:]
        d, d_h = relative(want, torch.cat(pieces, dim=1)), relative(want_h, run("hidden_states", ids, img)[0])
        print(f"{label}: max relative |transformers - export| cached logits {d:.2e}, hidden states {d_h:.2e}")
        limit = 1e-5 if dtype == "f32" else HALF_LIMIT[dtype]
        assert d < limit and d_h < limit, "export does not reproduce the model"


if __name__ == "__main__":
    (model_dir,), dtype = command_line("python scripts/export_llm.py MODEL_DIR [--dtype f32|f16|bf16]")
    main(model_dir, dtype)
