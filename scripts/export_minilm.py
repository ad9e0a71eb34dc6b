"""Export a sentence-transformers BERT folder to the files ragar's ort and
tch backends read, from the same weights candle reads (model.safetensors):

  model.onnx  ONNX (opset 17): input_ids, attention_mask, token_type_ids
              [batch, seq] int64 -> last_hidden_state [batch, seq, hidden] f32
  model.ts    TorchScript (traced), same inputs in that order, same output,
              on the device its inputs are on

`--dtype f16` (or bf16) writes model.f16.ts instead (last_hidden_state in
f16), which the tch backend reads for `dtype: f16`; ONNX stays f32.

Usage: python scripts/export_minilm.py MODEL_DIR [--dtype f32|f16|bf16]
Real checkpoints work the same way: point it at any BERT sentence model folder.
"""
import copy
import os

import torch
from ragar_export import DTYPES, HALF_LIMIT, command_line, relative, save_onnx, trace, ts_name
from transformers import AutoModel


class LastHiddenState(torch.nn.Module):
    def __init__(self, bert):
        super().__init__()
        self.bert = bert

    def forward(self, input_ids, attention_mask, token_type_ids):
        return self.bert(input_ids=input_ids, attention_mask=attention_mask,
                         token_type_ids=token_type_ids).last_hidden_state


def example(batch, seq):
    g = torch.Generator().manual_seed(batch * 100 + seq)
    ids = torch.randint(1000, 2000, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[0, seq // 2:] = 0  # some padding, as in real batches
    return ids, mask, torch.zeros(batch, seq, dtype=torch.long)


def main(model_dir, dtype):
    torch.manual_seed(0)
    # Eager attention: the exported graph must not depend on SDPA kernels.
    bert = AutoModel.from_pretrained(model_dir, attn_implementation="eager").eval()
    wrapper = LastHiddenState(bert).eval()
    trace_inputs = example(2, 16)

    ts_path = os.path.join(model_dir, ts_name("model", dtype))
    if dtype != "f32":
        # A half copy traced (`wrapper` stays the f32 reference); no ONNX.
        trace(copy.deepcopy(wrapper).to(DTYPES[dtype]), trace_inputs, ts_path)
        for shape in [(1, 5), (3, 40)]:
            x = example(*shape)
            with torch.no_grad():
                d = relative(wrapper(*x), torch.jit.load(ts_path)(*x).float())
            print(f"shape {shape} {dtype}: max |torch f32 - torchscript {dtype}| / max |torch| = {d:.2e}")
            assert d < HALF_LIMIT[dtype], "export does not reproduce the model"
        return
    onnx_path = os.path.join(model_dir, "model.onnx")
    save_onnx(onnx_path, wrapper, trace_inputs, ["input_ids", "attention_mask", "token_type_ids"],
              ["last_hidden_state"], {n: {0: "batch", 1: "sequence"} for n in
                                      ["input_ids", "attention_mask", "token_type_ids", "last_hidden_state"]})
    trace(wrapper, trace_inputs, ts_path)

    # The traced graph and the ONNX graph must generalise to other shapes.
    import onnxruntime as ort
    sess = ort.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
    for shape in [(1, 5), (3, 40)]:
        x = example(*shape)
        with torch.no_grad():
            want = wrapper(*x)
            got_ts = torch.jit.load(ts_path)(*x)
        got_onnx = sess.run(None, {"input_ids": x[0].numpy(), "attention_mask": x[1].numpy(),
                                   "token_type_ids": x[2].numpy()})[0]
        d_ts = (want - got_ts).abs().max().item()
        d_onnx = abs(want.numpy() - got_onnx).max()
        print(f"shape {shape}: max |torch - torchscript| = {d_ts:.2e}, max |torch - onnx| = {d_onnx:.2e}")
        assert d_ts < 1e-4 and d_onnx < 1e-4, "export does not reproduce the model"


if __name__ == "__main__":
    (model_dir,), dtype = command_line("python scripts/export_minilm.py MODEL_DIR [--dtype f32|f16|bf16]")
    main(model_dir, dtype)
