"""What ragar's export scripts share: atomic writes of the ONNX graph and
the TorchScript module of one wrapper, TorchScript modules that run on any
device (`trace`), half-precision TorchScript exports (`--dtype`), running
the exported files back for the self-checks, and the flat key/value-cache
layout the cached decoders take (`past_key_values.{i}.{key,value}` in,
`present.{i}.{key,value}` out, layer by layer, key then value).
"""
import os
import sys

import onnx_shapes
import torch
from transformers import DynamicCache


def save(path, write):
    write(path + ".part")
    os.replace(path + ".part", path)


def save_onnx(path, module, inputs, input_names, output_names, dynamic_axes):
    """Export `module` on `inputs` to the ONNX graph `path` (opset 17,
    `dynamic_axes` dynamic), with the shape arithmetic its axes decide folded
    into constants (`onnx_shapes.fold`), written atomically."""
    def write(p):
        torch.onnx.export(module, inputs, p, dynamo=False, opset_version=17, input_names=input_names,
                          output_names=output_names, dynamic_axes=dynamic_axes)
        counts = onnx_shapes.fold_file(p)
        print(f"{os.path.basename(path)}: {counts['dropped']} shape-arithmetic nodes folded away")
    save(path, write)


# The TorchScript precisions an export can be written in, and the suffix
# ragar's tch plugin looks for (`dtype: f16` reads `model.f16.ts`).
DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
# How far a half export may be from the f32 model, relative to its largest
# output: f16 keeps 11 significant bits, bf16 8. Measured on the test
# checkpoints: f16 up to 4.4e-3 (the tiny SD UNet), bf16 up to 7.2e-2 (the
# same UNet; 0.5-2e-2 elsewhere). Wiring mistakes give errors of order 1.
HALF_LIMIT = {"f16": 1e-2, "bf16": 1e-1}


def command_line(usage):
    """(positional arguments, dtype name) of `SCRIPT ARGS... [--dtype f32|f16|bf16]`."""
    args, dtype = list(sys.argv[1:]), "f32"
    if "--dtype" in args:
        i = args.index("--dtype")
        if i + 1 >= len(args) or args[i + 1] not in DTYPES:
            sys.exit(f"--dtype takes one of {', '.join(DTYPES)}\nusage: {usage}")
        dtype = args[i + 1]
        del args[i:i + 2]
    if not args or any(a.startswith("--") for a in args):
        sys.exit(f"usage: {usage}")
    return args, dtype


def ts_name(name, dtype):
    """`model` -> `model.ts` (f32) or `model.f16.ts`: the file the tch plugin opens for `dtype`."""
    return f"{name}.ts" if dtype == "f32" else f"{name}.{dtype}.ts"


def cast(inputs, dtype):
    """The floating-point tensors of `inputs` in `dtype` (a DTYPES key); ids and masks stay."""
    return tuple(x.to(DTYPES[dtype]) if x.is_floating_point() else x for x in inputs)


def follow_input_device(traced):
    """Make a traced module run on the device its inputs are on.

    Tracing records every device argument it sees as a constant: diffusers'
    timestep embedding (`torch.arange(..., device=timesteps.device)`) and
    transformers' mask builders become `arange(..., device="cpu")` in a
    module traced on the CPU, and that module then fails on CUDA with tensors
    on two devices. Each such constant is replaced by the device of the
    graph's first tensor input (`prim::device`), in every submodule's graph.
    Returns how many constants were replaced.
    """
    replaced = 0
    for module in traced.modules():
        try:
            graph = module.graph
        except RuntimeError:  # containers (ModuleList) have no forward
            continue
        consts = [n for n in graph.nodes()
                  if n.kind() == "prim::Constant" and n.output().type().kind() == "DeviceObjType"]
        if not consts:
            continue
        tensors = [v for v in graph.inputs() if v.type().kind() == "TensorType"]
        if not tensors:
            raise RuntimeError(f"{module.original_name}: a device constant but no tensor input to take "
                               "the device from")
        device = graph.create("prim::device", [tensors[0]])
        device.output().setType(torch._C.DeviceObjType.get())
        device.insertBefore(next(iter(graph.nodes())))
        for c in consts:
            c.output().replaceAllUsesWith(device.output())
            c.destroy()
        replaced += len(consts)
    return replaced


def device_constants(path):
    """How many device constants the TorchScript module at `path` holds (0 after `trace`)."""
    return str(torch.jit.load(path).inlined_graph).count(": Device = prim::Constant")


def trace(module, inputs, path):
    """Trace `module` on `inputs` (no autograd) and save it atomically to
    `path`, running on whatever device its inputs are on (`follow_input_device`)."""
    with torch.no_grad():
        traced = torch.jit.trace(module, inputs, check_trace=False)
    follow_input_device(traced)
    save(path, traced.save)
    left = device_constants(path)
    if left:
        raise RuntimeError(f"{path}: {left} device constants left after tracing")


def export(root, name, module, inputs, names, outs, axes, dtype="f32", traced=None):
    """`root/name.onnx` (opset 17, dynamic `axes`) and `root/name.ts`
    (traced from `traced`, where it is given, else `module`); for a half
    `dtype`, `root/name.f16.ts` alone from a half copy of it, traced on
    `inputs` cast to it."""
    path = os.path.join(root, name)
    traced = module if traced is None else traced
    if dtype != "f32":
        import copy
        trace(copy.deepcopy(traced).to(DTYPES[dtype]), cast(inputs, dtype), os.path.join(root, ts_name(name, dtype)))
        return
    save_onnx(path + ".onnx", module, inputs, names, outs, axes)
    trace(traced, inputs, path + ".ts")


def runners(root, graphs, dtype="f32"):
    """[("torchscript", run), ("onnx", run)]: run(graph, *inputs) -> list of
    outputs. For a half `dtype`, the half TorchScript modules alone, fed
    their float inputs in it, their outputs back in f32."""
    modules = {m: torch.jit.load(os.path.join(root, ts_name(m, dtype))) for m in graphs}

    def ts(m, *x):
        with torch.no_grad():
            o = modules[m](*cast(x, dtype))
        return [t.float() if t.is_floating_point() else t for t in (o if isinstance(o, (tuple, list)) else [o])]

    if dtype != "f32":
        return [(f"torchscript {dtype}", ts)]
    import onnxruntime as ort
    sessions = {m: ort.InferenceSession(os.path.join(root, m + ".onnx"), providers=["CPUExecutionProvider"])
                for m in graphs}

    def onnx(m, *x):
        names = [i.name for i in sessions[m].get_inputs()]
        return [torch.from_numpy(o) for o in sessions[m].run(None, {k: v.numpy() for k, v in zip(names, x)})]

    return [("torchscript", ts), ("onnx", onnx)]


def relative(want, got):
    """max |want - got| / max |want|."""
    return (want - got).abs().max().item() / (want.abs().max().item() + 1e-12)


def with_cache(forward, cache):
    """`{name: cache}` for `forward`'s key/value-cache argument: transformers
    renames `past_key_values` to `cache` model by model (5.2x; the old name
    goes in 5.40), and the GPU machines run older versions than setup pins."""
    import inspect
    name = "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"
    return {name: cache}


def cache_out(out):
    """The cache a model output returns, under either name (see `with_cache`)."""
    return out.cache if getattr(out, "cache", None) is not None else out.past_key_values


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
