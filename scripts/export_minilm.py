"""Export a sentence-transformers BERT folder to the files ragar's ort and
tch backends read, from the same weights candle reads (model.safetensors):

  model.onnx  ONNX (opset 17): input_ids, attention_mask, token_type_ids
              [batch, seq] int64 -> last_hidden_state [batch, seq, hidden] f32
  model.ts    TorchScript (traced), same inputs in that order, same output,
              on the device its inputs are on

Usage: python scripts/export_minilm.py MODEL_DIR
Real checkpoints work the same way: point it at any BERT sentence model folder.
"""
import os
import sys

import torch
from ragar_export import save, trace
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


def main(model_dir):
    torch.manual_seed(0)
    # Eager attention: the exported graph must not depend on SDPA kernels.
    bert = AutoModel.from_pretrained(model_dir, attn_implementation="eager").eval()
    wrapper = LastHiddenState(bert).eval()
    trace_inputs = example(2, 16)

    onnx_path = os.path.join(model_dir, "model.onnx")
    save(onnx_path, lambda p: torch.onnx.export(
        wrapper, trace_inputs, p, dynamo=False, opset_version=17,
        input_names=["input_ids", "attention_mask", "token_type_ids"],
        output_names=["last_hidden_state"],
        dynamic_axes={n: {0: "batch", 1: "sequence"} for n in
                      ["input_ids", "attention_mask", "token_type_ids", "last_hidden_state"]},
    ))
    ts_path = os.path.join(model_dir, "model.ts")
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
    main(sys.argv[1])
