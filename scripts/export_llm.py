"""Export an HF causal LM folder (Llama, Qwen2, SmolLM2, ... as
transformers' AutoModelForCausalLM loads it) to the graphs ragar's ort and
tch KeywordLLMs read, next to its weights:

  model.{onnx,ts}          the decoder with a key/value cache, in Optimum's
                           "text-generation-with-past" names:
                           input_ids [b, t] int64, attention_mask [b, p + t]
                           int64, position_ids [b, t] int64,
                           past_key_values.{i}.{key,value} [b, kv_heads, p, head_dim]
                           -> logits [b, t, vocab],
                           present.{i}.{key,value} [b, kv_heads, p + t, head_dim]
                           (p = 0 for the prompt: empty past tensors)
  hidden_states.{onnx,ts}  Eq. 7: input_ids [1, t] int64, img_embeddings
                           [n, hidden] f32 (the [IMG] rows, appended after
                           the prompt's token embeddings)
                           -> hidden_states [1, t + n, hidden] (after the
                           final norm)

Tokenizer, chat template, sampling and the default [IMG] rows stay in
ragar (ragar_core::llm), shared with candle. Checked against transformers
at other lengths, including an empty cache.

Usage: python scripts/export_llm.py MODEL_DIR
"""
import os
import sys

import torch
from transformers import AutoModelForCausalLM, DynamicCache


class Decoder(torch.nn.Module):
    """One decoding call: new tokens on top of a flat list of past tensors."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.layers = model.config.num_hidden_layers

    def forward(self, input_ids, attention_mask, position_ids, *past):
        cache = DynamicCache(config=self.model.config)
        for i in range(self.layers):
            cache.update(past[2 * i], past[2 * i + 1], i)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         past_key_values=cache, use_cache=True, return_dict=True)
        present = []
        for layer in out.past_key_values.layers[:self.layers]:
            present += [layer.keys, layer.values]
        return (out.logits, *present)


class Hidden(torch.nn.Module):
    """Final hidden states of the prompt's tokens followed by the [IMG] rows."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, img_embeddings):
        emb = self.model.get_input_embeddings()(input_ids)
        x = torch.cat([emb, img_embeddings.to(emb.dtype).unsqueeze(0)], dim=1)
        return self.model.model(inputs_embeds=x, return_dict=True).last_hidden_state


def save(path, write):
    write(path + ".part")
    os.replace(path + ".part", path)


def shapes(cfg):
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return cfg.num_hidden_layers, cfg.num_key_value_heads or heads, head_dim


def decoder_inputs(cfg, past_len, new, g):
    layers, kv, hd = shapes(cfg)
    ids = torch.randint(0, cfg.vocab_size, (1, new), generator=g)
    mask = torch.ones(1, past_len + new, dtype=torch.long)
    pos = torch.arange(past_len, past_len + new).unsqueeze(0)
    past = [torch.randn(1, kv, past_len, hd, generator=g) for _ in range(2 * layers)]
    return (ids, mask, pos, *past)


def main(root):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(root, attn_implementation="eager", dtype=torch.float32).eval()
    cfg = model.config
    layers, _, _ = shapes(cfg)
    decoder, hidden = Decoder(model).eval(), Hidden(model).eval()
    g = torch.Generator().manual_seed(1)
    kv_names = [f"{p}.{i}.{k}" for p in ("past_key_values",) for i in range(layers) for k in ("key", "value")]
    present = [f"present.{i}.{k}" for i in range(layers) for k in ("key", "value")]
    dec_names = ["input_ids", "attention_mask", "position_ids"] + kv_names
    dec_axes = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "total_sequence"},
                "position_ids": {0: "batch", 1: "sequence"}, "logits": {0: "batch", 1: "sequence"}}
    dec_axes.update({n: {0: "batch", 2: "past_sequence"} for n in kv_names})
    dec_axes.update({n: {0: "batch", 2: "total_sequence"} for n in present})
    img = torch.randn(3, cfg.hidden_size, generator=g)
    hid_ids = torch.randint(0, cfg.vocab_size, (1, 5), generator=g)
    for name, module, inputs, names, outs, axes in [
        ("model", decoder, decoder_inputs(cfg, 4, 3, g), dec_names, ["logits"] + present, dec_axes),
        ("hidden_states", hidden, (hid_ids, img), ["input_ids", "img_embeddings"], ["hidden_states"],
         {"input_ids": {1: "sequence"}, "img_embeddings": {0: "img_tokens"}, "hidden_states": {1: "total_sequence"}}),
    ]:
        path = os.path.join(root, name)
        save(path + ".onnx", lambda p: torch.onnx.export(
            module, inputs, p, dynamo=False, opset_version=17, input_names=names, output_names=outs,
            dynamic_axes=axes))
        with torch.no_grad():
            traced = torch.jit.trace(module, inputs, check_trace=False)
        save(path + ".ts", traced.save)

    import onnxruntime as ort
    checks = [("model", decoder, decoder_inputs(cfg, p, t, g), dec_names) for p, t in [(0, 6), (9, 1), (2, 4)]]
    checks.append(("hidden_states", hidden, (torch.randint(0, cfg.vocab_size, (1, 7), generator=g),
                                             torch.randn(8, cfg.hidden_size, generator=g)),
                   ["input_ids", "img_embeddings"]))
    sessions = {}
    for name, module, x, names in checks:
        path = os.path.join(root, name)
        if name not in sessions:
            sessions[name] = (torch.jit.load(path + ".ts"),
                              ort.InferenceSession(path + ".onnx", providers=["CPUExecutionProvider"]))
        ts, onnx = sessions[name]
        with torch.no_grad():
            want = module(*x)
            got_ts = ts(*x)
        want = want if isinstance(want, tuple) else (want,)
        got_ts = got_ts if isinstance(got_ts, tuple) else (got_ts,)
        got_onnx = onnx.run(None, {n: v.numpy() for n, v in zip(names, x)})
        worst_ts = worst_onnx = 0.0
        for w, a, b in zip(want, got_ts, got_onnx):
            assert tuple(a.shape) == tuple(w.shape) == b.shape, f"{name}: shapes {a.shape} {b.shape} vs {w.shape}"
            scale = w.abs().max().item() + 1e-12
            worst_ts = max(worst_ts, (w - a).abs().max().item() / scale)
            worst_onnx = max(worst_onnx, abs(w.numpy() - b).max() / scale)
        print(f"{name} {[tuple(v.shape) for v in x[:1]]} past {x[3].shape[2] if name == 'model' else '-'}: "
              f"max relative |transformers - torchscript| = {worst_ts:.2e}, |transformers - onnx| = {worst_onnx:.2e}")
        assert worst_ts < 1e-5 and worst_onnx < 1e-5, "export does not reproduce the model"


if __name__ == "__main__":
    main(sys.argv[1])
