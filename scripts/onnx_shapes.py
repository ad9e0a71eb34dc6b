"""Fold the shape arithmetic of an exported ONNX graph that its dimensions
already decide.

torch.onnx.export writes every `x.view(*x.shape[:-1], heads, -1)` as
Shape -> Gather -> Unsqueeze -> Concat -> Reshape, and every `expand` or
`x.shape[-1] // 2` the same way, because the batch and sequence axes are
dynamic. ONNX Runtime cannot fold those chains (a Shape of a tensor with a
dynamic axis is not constant), so it runs them on every call: a third to a
half of the nodes of a transformer's graph (SmolLM2-135M's cached decoder:
1,500 of 2,935 after ONNX Runtime's own optimizations), at a dispatch each.
For the small per-call work of batch-1 decoding and short texts, that
dispatch is what ort loses to candle.

ONNX Runtime's symbolic shape inference knows each of those values as an
expression in the graph's named axes. With it:

- a Reshape's target becomes a constant: an entry equal to the same axis of
  the input is 0 (ONNX: keep that axis), a known number stays;
- an Expand's target the same way, with 1 (broadcast: keep the input's axis);
- any other integer input whose value is fully known (a Slice bound from a
  static axis, a ConstantOfShape of static size) becomes a constant.

Chains left without a consumer are dropped. An entry that is neither known
nor the same expression as the input's axis leaves its node as it was. Where
two named axes meet in a broadcast (a position embedding's sliced length
added to the tokens' length), the inference takes them to be equal (its
auto-merge), as every input the model accepts has them. The export scripts'
self-checks and ragar's parity tests run the folded graphs at several batch
sizes and lengths, and tests/python/onnx_shapes_fold.py holds a decoder's
folded graph to its unfolded one. A graph the inference cannot follow is
left as exported.
"""
import os
import sys

import numpy as np
import onnx
from onnx import numpy_helper


def _equal(a, b):
    import sympy
    try:
        return sympy.simplify(sympy.sympify(a) - sympy.sympify(b)) == 0
    except (TypeError, ValueError, sympy.SympifyError):
        return False


def _known(v):
    """v as an int if the inference knows its number, else None."""
    try:
        return int(v) if getattr(v, "is_number", True) and int(v) == v else None
    except (TypeError, ValueError):
        return None


def _values(data):
    """The inference's value of a shape tensor (a list, an array or a scalar) as a flat list."""
    if isinstance(data, (list, tuple)):
        return list(data)
    if isinstance(data, np.ndarray):
        return data.reshape(-1).tolist()
    return [data]


def _none_folded():
    return {"reshape": 0, "expand": 0, "constant": 0, "dropped": 0}


def fold(model):
    """Rewrite `model` (an onnx.ModelProto, in place) as above; returns
    {"reshape": n, "expand": n, "constant": n, "dropped": n} (how many
    targets became constants, and how many nodes were dropped after)."""
    counts = _none_folded()
    try:
        # Inside: an onnxruntime without its tools (another build, another
        # version on a GPU machine) leaves the graph as exported.
        from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference
        inference = SymbolicShapeInference(int_max=2**31 - 1, auto_merge=True, guess_output_rank=False, verbose=0)
        inference._preprocess(model)
        complete = False
        while inference.run_:
            complete = inference._infer_impl()
    except Exception as e:  # it covers most, not all, operators
        print(f"note: shape folding skipped: symbolic shape inference failed ({type(e).__name__}: {e})",
              file=sys.stderr)
        return counts
    if not complete:
        print("note: shape folding skipped: symbolic shape inference left shapes unknown", file=sys.stderr)
        return counts
    data = inference.sympy_data_
    graph = model.graph
    inferred = {n.name or n.output[0]: n for n in inference.out_mp_.graph.node}
    produced = {o: n for n in graph.node for o in n.output}
    constant = {i.name for i in graph.initializer}
    constant.update(n.output[0] for n in graph.node if n.op_type == "Constant")
    dtypes = {name: (vi.type.tensor_type.elem_type, len(vi.type.tensor_type.shape.dim))
              for name, vi in inference.known_vi_.items()}
    added = []

    def make_constant(node, index, values, dtype=np.int64, scalar=False):
        name = f"{node.input[index]}__folded_{len(added)}"
        array = np.array(values[0] if scalar else values, dtype=dtype)
        added.append(numpy_helper.from_array(array, name))
        node.input[index] = name

    for node in graph.node:
        twin = inferred.get(node.name or node.output[0])
        if twin is None:
            continue
        if node.op_type in ("Reshape", "Expand") and len(node.input) == 2 and node.input[1] not in constant:
            target = data.get(node.input[1])
            if target is None:
                continue
            if node.op_type == "Reshape" and any(a.name == "allowzero" and a.i for a in node.attribute):
                continue
            dims = inference._get_sympy_shape(twin, 0)
            target = _values(target)
            # Expand aligns its target with the input's axes from the right.
            offset = len(target) - len(dims) if node.op_type == "Expand" else 0
            keep = 0 if node.op_type == "Reshape" else 1
            folded = []
            for i, v in enumerate(target):
                k = _known(v)
                axis = i - offset
                if k is not None:  # a Reshape's 0 keeps its meaning
                    folded.append(k)
                elif 0 <= axis < len(dims) and _equal(v, dims[axis]):
                    folded.append(keep)
                else:
                    folded = None
                    break
            if folded is None or folded.count(-1) > 1:
                continue
            make_constant(node, 1, folded)
            counts[node.op_type.lower()] += 1
            continue
        # Fully known integer inputs of any other node.
        for index, name in enumerate(node.input):
            if not name or name in constant or name not in data or name not in produced:
                continue
            elem, rank = dtypes.get(name, (None, None))
            if elem not in (onnx.TensorProto.INT64, onnx.TensorProto.INT32) or rank not in (0, 1):
                continue
            values = [_known(v) for v in _values(data[name])]
            if not values or any(v is None for v in values) or (rank == 0 and len(values) != 1):
                continue
            dtype = np.int64 if elem == onnx.TensorProto.INT64 else np.int32
            make_constant(node, index, values, dtype, scalar=rank == 0)
            counts["constant"] += 1
    graph.initializer.extend(added)
    counts["dropped"] = _drop_unused(graph)
    return counts


def _drop_unused(graph):
    """Remove nodes and initializers no graph output depends on; returns how many nodes."""
    live = {o.name for o in graph.output}
    kept = []
    for node in reversed(list(graph.node)):
        if any(o in live for o in node.output):
            kept.append(node)
            live.update(node.input)
            for a in node.attribute:  # subgraphs (If / Loop) read outer names
                if a.type == onnx.AttributeProto.GRAPH:
                    live.update(i for n in a.g.node for i in n.input)
    dropped = len(graph.node) - len(kept)
    del graph.node[:]
    graph.node.extend(reversed(kept))
    inits = [i for i in graph.initializer if i.name in live]
    del graph.initializer[:]
    graph.initializer.extend(inits)
    return dropped


def fold_file(path):
    """Fold the graph at `path` in place (atomically); returns the counts."""
    model = onnx.load(path, load_external_data=False)
    if any(i.data_location == onnx.TensorProto.EXTERNAL for i in model.graph.initializer):
        # Weights beside the graph (over 2 GB): one protobuf cannot hold them.
        print(f"note: {path}: shape folding skipped: its weights are stored outside the graph", file=sys.stderr)
        return _none_folded()
    try:
        counts = fold(model)
    except Exception as e:  # the inference's internals are not a stable API
        print(f"note: {path}: shape folding skipped: {type(e).__name__}: {e}", file=sys.stderr)
        return _none_folded()
    if counts["reshape"] + counts["expand"] + counts["constant"]:
        onnx.checker.check_model(model)
        onnx.save(model, path + ".fold")
        os.replace(path + ".fold", path)
    return counts


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit("usage: onnx_shapes.py GRAPH.onnx...  (folds each graph in place)")
    for p in sys.argv[1:]:
        print(p, fold_file(p))
