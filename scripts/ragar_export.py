"""What ragar's export scripts share: atomic writes of the ONNX graph and
the TorchScript module of one wrapper, running the exported files back for
the self-checks, and the flat key/value-cache layout the cached decoders
take (`past_key_values.{i}.{key,value}` in, `present.{i}.{key,value}` out,
layer by layer, key then value).
"""
import os

import torch
from transformers import DynamicCache


def save(path, write):
    write(path + ".part")
    os.replace(path + ".part", path)


def export(root, name, module, inputs, names, outs, axes):
    """`root/name.onnx` (opset 17, dynamic `axes`) and `root/name.ts` (traced)."""
    path = os.path.join(root, name)
    save(path + ".onnx", lambda p: torch.onnx.export(
        module, inputs, p, dynamo=False, opset_version=17, input_names=names, output_names=outs,
        dynamic_axes=axes))
    with torch.no_grad():
        traced = torch.jit.trace(module, inputs, check_trace=False)
    save(path + ".ts", traced.save)


def runners(root, graphs):
    """[("torchscript", run), ("onnx", run)]: run(graph, *inputs) -> list of outputs."""
    import onnxruntime as ort
    sessions = {m: ort.InferenceSession(os.path.join(root, m + ".onnx"), providers=["CPUExecutionProvider"])
                for m in graphs}
    modules = {m: torch.jit.load(os.path.join(root, m + ".ts")) for m in graphs}

    def onnx(m, *x):
        names = [i.name for i in sessions[m].get_inputs()]
        return [torch.from_numpy(o) for o in sessions[m].run(None, {k: v.numpy() for k, v in zip(names, x)})]

    def ts(m, *x):
        with torch.no_grad():
            o = modules[m](*x)
        return list(o) if isinstance(o, (tuple, list)) else [o]

    return [("torchscript", ts), ("onnx", onnx)]


def relative(want, got):
    """max |want - got| / max |want|."""
    return (want - got).abs().max().item() / (want.abs().max().item() + 1e-12)


def kv_names(layers, prefix):
    return [f"{prefix}.{i}.{k}" for i in range(layers) for k in ("key", "value")]


def cache_of(flat, layers, config):
    """A DynamicCache holding the flat key/value tensors."""
    cache = DynamicCache(config=config)
    for i in range(layers):
        cache.update(flat[2 * i], flat[2 * i + 1], i)
    return cache


def flat_of(cache, layers):
    """The flat key/value tensors of a DynamicCache."""
    out = []
    for layer in cache.layers[:layers]:
        out += [layer.keys, layer.values]
    return out
