#!/usr/bin/env python3
"""Build an ONNX encoder graph from a Hugging Face BERT checkpoint, without PyTorch.

Reads `config.json` + `model.safetensors` of a `BertModel` (absolute positions, GELU; e.g.
all-MiniLM-L6-v2, bge-small, e5-small) and writes an opset-17 graph:

  inputs   input_ids, attention_mask, token_type_ids   int64 [batch, seq]
  output   last_hidden_state                            float32 [batch, seq, hidden]

The graph is the BERT forward (embeddings + LayerNorm, N layers of masked multi-head attention
and a GELU feed-forward, post-LayerNorm), written with ONNX Runtime's fused com.microsoft
operators (Attention, SkipLayerNormalization, BiasGelu; the quantiser turns Attention into
QAttention); --portable writes standard ONNX operators only. The script checks its graph against an independent
numpy forward of the same weights (max abs difference printed; it fails above --tolerance).

With --int8 OUT it also writes a dynamically quantised copy (int8 weights, per-channel scales:
per-tensor scales drift on MiniLM, docs/BENCHMARKS.md) using onnxruntime.quantization.

With --head HEAD.safetensors it writes a sequence-classification model instead (mean pooling,
optional --normalize, the head: `classifier.weight/bias`, after `hidden.weight/bias` and a ReLU
when the head has a hidden layer; output `logits`), e.g. to ship an encoder + head trained by
`safepipe classifier train` as one file.

Usage: bert_to_onnx.py MODEL_DIR OUT.onnx [--int8 OUT.int8.onnx] [--head HEAD.safetensors]
"""
import argparse
import json
import math
import os
import struct
import sys

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

DTYPES = {"F32": np.float32, "F16": np.float16, "I64": np.int64, "BF16": None}


def read_safetensors(path, checkpoint=True):
    """Tensors of a safetensors file as numpy arrays (F32/F16/I64), keyed by name."""
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        data = f.read()
    out = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        dtype = DTYPES.get(meta["dtype"])
        if dtype is None:
            sys.exit(f"bert_to_onnx: {name} has dtype {meta['dtype']}; convert the checkpoint to F32 first")
        start, end = meta["data_offsets"]
        out[name] = np.frombuffer(data[start:end], dtype=dtype).reshape(meta["shape"]).astype(
            np.float32 if dtype != np.int64 else np.int64)
    # Some checkpoints prefix every tensor with "bert." (BertForSequenceClassification).
    if checkpoint and not any(k.startswith("embeddings.") for k in out):
        out = {k[len("bert."):]: v for k, v in out.items() if k.startswith("bert.")}
    return out


class Graph:
    """A tiny builder: named initialisers and nodes, unique output names."""

    def __init__(self):
        self.nodes, self.inits, self.n = [], [], 0

    def init(self, name, array):
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def op(self, op_type, inputs, **attrs):
        self.n += 1
        out = f"{op_type.lower()}_{self.n}"
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=out, **attrs))
        return out


def build(config, w, fused=True, head=None, normalize=False):
    hidden = config["hidden_size"]
    heads = config["num_attention_heads"]
    head_dim = hidden // heads
    eps = float(config.get("layer_norm_eps", 1e-12))
    if config.get("position_embedding_type", "absolute") != "absolute":
        sys.exit("bert_to_onnx: only absolute position embeddings are supported")
    if config.get("hidden_act", "gelu") not in ("gelu", "gelu_python"):
        sys.exit(f"bert_to_onnx: activation {config.get('hidden_act')} is not supported (gelu only)")
    g = Graph()

    def linear(x, prefix):
        wt = g.init(prefix + ".weight_t", w[prefix + ".weight"].T)
        b = g.init(prefix + ".bias", w[prefix + ".bias"])
        return g.op("Add", [g.op("MatMul", [x, wt]), b])

    def layer_norm(x, prefix):
        scale = g.init(prefix + ".weight", w[prefix + ".weight"])
        bias = g.init(prefix + ".bias", w[prefix + ".bias"])
        return g.op("LayerNormalization", [x, scale, bias], axis=-1, epsilon=eps)

    # Embeddings: words + positions 0..seq-1 + token types.
    words = g.op("Gather", ["embeddings.word_embeddings.weight", "input_ids"], axis=0)
    g.init("embeddings.word_embeddings.weight", w["embeddings.word_embeddings.weight"])
    # Positions 0..seq-1: the first `seq` rows of the position table.
    seq = g.op("Shape", ["input_ids"], start=1, end=2)
    g.init("embeddings.position_embeddings.weight", w["embeddings.position_embeddings.weight"])
    zero = g.init("zero_1d", np.array([0], dtype=np.int64))
    pos = g.op("Slice", ["embeddings.position_embeddings.weight", zero, seq, zero])
    g.init("embeddings.token_type_embeddings.weight", w["embeddings.token_type_embeddings.weight"])
    types = g.op("Gather", ["embeddings.token_type_embeddings.weight", "token_type_ids"], axis=0)
    x = layer_norm(g.op("Add", [g.op("Add", [words, pos]), types]), "embeddings.LayerNorm")

    if not fused:
        one = g.init("one_f", np.array(1.0, dtype=np.float32))
        half = g.init("half", np.array(0.5, dtype=np.float32))
        sqrt2 = g.init("sqrt2", np.array(math.sqrt(2.0), dtype=np.float32))
        # Additive attention mask [batch, 1, 1, seq]: 0 where attended, -10000 at padding (as BERT).
        mask = g.op("Cast", ["attention_mask"], to=TensorProto.FLOAT)
        mask = g.op("Mul", [g.op("Sub", [one, mask]), g.init("mask_value", np.array(-10000.0, dtype=np.float32))])
        mask = g.op("Unsqueeze", [mask, g.init("mask_axes", np.array([1, 2], dtype=np.int64))])
        split_heads = g.init("split_heads", np.array([0, 0, heads, head_dim], dtype=np.int64))
        merge_heads = g.init("merge_heads", np.array([0, 0, hidden], dtype=np.int64))
        scale = g.init("attention_scale", np.array(1.0 / math.sqrt(head_dim), dtype=np.float32))

    def contrib(op_type, inputs, **attrs):
        g.n += 1
        out = f"{op_type.lower()}_{g.n}"
        g.nodes.append(helper.make_node(op_type, inputs, [out], name=out, domain="com.microsoft", **attrs))
        return out

    def residual_norm(x, y, dense, norm):
        """LayerNorm(x + dense(y)): one SkipLayerNormalization when fused."""
        if not fused:
            return layer_norm(g.op("Add", [x, linear(y, dense)]), norm)
        wt = g.init(dense + ".weight_t", w[dense + ".weight"].T)
        projected = g.op("MatMul", [y, wt])
        return contrib("SkipLayerNormalization", [projected, x, g.init(norm + ".weight", w[norm + ".weight"]),
                                                  g.init(norm + ".bias", w[norm + ".bias"]),
                                                  g.init(dense + ".bias", w[dense + ".bias"])], epsilon=eps)

    mask_i32 = g.op("Cast", ["attention_mask"], to=TensorProto.INT32)
    for i in range(config["num_hidden_layers"]):
        p = f"encoder.layer.{i}."
        if fused:
            # ONNX Runtime's fused Attention (com.microsoft): packed QKV projection, masked
            # softmax attention, heads merged; the dynamic quantiser turns it into QAttention.
            names = [p + "attention.self." + n for n in ("query", "key", "value")]
            qkv_w = g.init(p + "attention.qkv.weight_t", np.concatenate([w[n + ".weight"].T for n in names], axis=1))
            qkv_b = g.init(p + "attention.qkv.bias", np.concatenate([w[n + ".bias"] for n in names]))
            g.n += 1
            ctx = f"attention_{g.n}"
            g.nodes.append(helper.make_node("Attention", [x, qkv_w, qkv_b, mask_i32], [ctx], name=ctx, domain="com.microsoft",
                                            num_heads=heads, mask_filter_value=-10000.0))
        else:
            q = g.op("Transpose", [g.op("Reshape", [linear(x, p + "attention.self.query"), split_heads])],
                     perm=[0, 2, 1, 3])
            k = g.op("Transpose", [g.op("Reshape", [linear(x, p + "attention.self.key"), split_heads])],
                     perm=[0, 2, 3, 1])
            v = g.op("Transpose", [g.op("Reshape", [linear(x, p + "attention.self.value"), split_heads])],
                     perm=[0, 2, 1, 3])
            scores = g.op("Add", [g.op("Mul", [g.op("MatMul", [q, k]), scale]), mask])
            probs = g.op("Softmax", [scores], axis=-1)
            ctx = g.op("Reshape", [g.op("Transpose", [g.op("MatMul", [probs, v])], perm=[0, 2, 1, 3]),
                                   merge_heads])
        x = residual_norm(x, ctx, p + "attention.output.dense", p + "attention.output.LayerNorm")
        if fused:
            wt = g.init(p + "intermediate.dense.weight_t", w[p + "intermediate.dense.weight"].T)
            h = contrib("BiasGelu", [g.op("MatMul", [x, wt]),
                                     g.init(p + "intermediate.dense.bias", w[p + "intermediate.dense.bias"])])
        else:
            h = linear(x, p + "intermediate.dense")
            # Exact GELU: 0.5 h (1 + erf(h / sqrt 2)).
            h = g.op("Mul", [g.op("Mul", [h, half]), g.op("Add", [g.op("Erf", [g.op("Div", [h, sqrt2])]), one])])
        x = residual_norm(x, h, p + "output.dense", p + "output.LayerNorm")

    ints = [helper.make_tensor_value_info(n, TensorProto.INT64, ["batch", "sequence"])
            for n in ("input_ids", "attention_mask", "token_type_ids")]
    if head is None:
        g.nodes.append(helper.make_node("Identity", [x], ["last_hidden_state"]))
        out = helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT, ["batch", "sequence", hidden])
    else:
        # A sequence-classification model: mean pooling over attended tokens, optional L2
        # normalisation, the head (an optional hidden layer with ReLU, then the output layer);
        # output `logits` [batch, labels].
        m = g.op("Unsqueeze", [g.op("Cast", ["attention_mask"], to=TensorProto.FLOAT),
                               g.init("pool_axes", np.array([2], dtype=np.int64))])
        summed = g.op("ReduceSum", [g.op("Mul", [x, m]), g.init("seq_axis", np.array([1], dtype=np.int64))],
                      keepdims=0)
        count = g.op("ReduceSum", [m, "seq_axis"], keepdims=0)
        pooled = g.op("Div", [summed, count])
        if normalize:
            pooled = g.op("LpNormalization", [pooled], axis=-1, p=2)
        def dense(x, name):
            return g.op("Add", [g.op("MatMul", [x, g.init(name + ".weight_t", head[name + ".weight"].T)]),
                                g.init(name + ".bias", head[name + ".bias"])])
        features = g.op("Relu", [dense(pooled, "hidden")]) if "hidden.weight" in head else pooled
        logits = dense(features, "classifier")
        g.nodes.append(helper.make_node("Identity", [logits], ["logits"]))
        out = helper.make_tensor_value_info("logits", TensorProto.FLOAT,
                                            ["batch", head["classifier.weight"].shape[0]])
    graph = helper.make_graph(g.nodes, "bert_encoder", ints, [out], g.inits)
    opsets = [helper.make_opsetid("", 17)] + ([helper.make_opsetid("com.microsoft", 1)] if fused else [])
    model = helper.make_model(graph, opset_imports=opsets,
                              producer_name="safepipe bert_to_onnx")
    model.ir_version = 8
    if not fused:
        onnx.checker.check_model(model)
    return model


def numpy_forward(config, w, ids, mask):
    """An independent BERT forward in float64, for the parity check."""
    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    d = hidden // heads
    eps = float(config.get("layer_norm_eps", 1e-12))
    w = {k: v.astype(np.float64) for k, v in w.items() if v.dtype != np.int64}

    def ln(x, p):
        mu = x.mean(-1, keepdims=True)
        var = ((x - mu) ** 2).mean(-1, keepdims=True)
        return (x - mu) / np.sqrt(var + eps) * w[p + ".weight"] + w[p + ".bias"]

    def lin(x, p):
        return x @ w[p + ".weight"].T + w[p + ".bias"]

    from math import erf
    verf = np.vectorize(erf)
    b, t = ids.shape
    x = w["embeddings.word_embeddings.weight"][ids] + w["embeddings.position_embeddings.weight"][:t] \
        + w["embeddings.token_type_embeddings.weight"][0]
    x = ln(x, "embeddings.LayerNorm")
    bias = (1.0 - mask[:, None, None, :]) * -10000.0
    for i in range(config["num_hidden_layers"]):
        p = f"encoder.layer.{i}."
        q, k, v = (lin(x, p + "attention.self." + n).reshape(b, t, heads, d).transpose(0, 2, 1, 3)
                   for n in ("query", "key", "value"))
        s = q @ k.transpose(0, 1, 3, 2) / math.sqrt(d) + bias
        s = np.exp(s - s.max(-1, keepdims=True))
        s /= s.sum(-1, keepdims=True)
        ctx = (s @ v).transpose(0, 2, 1, 3).reshape(b, t, hidden)
        x = ln(x + lin(ctx, p + "attention.output.dense"), p + "attention.output.LayerNorm")
        h = lin(x, p + "intermediate.dense")
        h = 0.5 * h * (1.0 + verf(h / math.sqrt(2.0)))
        x = ln(x + lin(h, p + "output.dense"), p + "output.LayerNorm")
    return x


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir", help="directory with config.json and model.safetensors")
    parser.add_argument("out", help="the fp32 ONNX file to write")
    parser.add_argument("--int8", help="also write a per-channel dynamically quantised copy here")
    parser.add_argument("--tolerance", type=float, default=1e-4, help="max abs difference vs numpy")
    parser.add_argument("--head", help="a safetensors head (classifier.weight/bias): write a logits model "
                                       "(mean pooling + head) instead of an encoder")
    parser.add_argument("--normalize", action="store_true", help="with --head: L2-normalise before the head")
    parser.add_argument("--portable", action="store_true",
                        help="standard ONNX ops only (no com.microsoft Attention): for runtimes other than ONNX Runtime")
    args = parser.parse_args()
    config = json.load(open(os.path.join(args.model_dir, "config.json")))
    weights = read_safetensors(os.path.join(args.model_dir, "model.safetensors"))
    head = None
    if args.head:
        head = read_safetensors(args.head, checkpoint=False)
    model = build(config, weights, fused=not args.portable, head=head, normalize=args.normalize)
    tmp = args.out + ".tmp"
    onnx.save(model, tmp)

    import onnxruntime as ort
    rng = np.random.default_rng(0)
    ids = rng.integers(1000, config["vocab_size"], size=(2, 9)).astype(np.int64)
    mask = np.ones_like(ids)
    mask[1, 6:] = 0
    session = ort.InferenceSession(tmp, providers=["CPUExecutionProvider"])
    output = "logits" if head else "last_hidden_state"
    got = session.run([output], {"input_ids": ids, "attention_mask": mask,
                                 "token_type_ids": np.zeros_like(ids)})[0]
    want = numpy_forward(config, weights, ids, mask.astype(np.float64))
    if head:
        fm = mask.astype(np.float64)[:, :, None]
        pooled = (want * fm).sum(1) / fm.sum(1)
        if args.normalize:
            pooled /= np.linalg.norm(pooled, axis=1, keepdims=True)
        def dense(x, name):
            return x @ head[name + ".weight"].T.astype(np.float64) + head[name + ".bias"]
        features = np.maximum(dense(pooled, "hidden"), 0.0) if "hidden.weight" in head else pooled
        diff = float(np.abs(got - dense(features, "classifier")).max())
    else:
        diff = float(np.abs(got - want)[mask.astype(bool)].max())
    if diff > args.tolerance:
        os.remove(tmp)
        sys.exit(f"bert_to_onnx: ONNX graph differs from the numpy forward by {diff:.2e} (> {args.tolerance})")
    os.replace(tmp, args.out)
    print(f"bert_to_onnx: wrote {args.out} (max |onnx - numpy| = {diff:.2e})")

    if args.int8:
        from onnxruntime.quantization import QuantType, quantize_dynamic
        tmp = args.int8 + ".tmp"
        # Shape inference cannot type the outputs of com.microsoft ops: tell the quantiser they are float.
        quantize_dynamic(args.out, tmp, per_channel=True, weight_type=QuantType.QInt8,
                         extra_options={"DefaultTensorType": TensorProto.FLOAT})
        os.replace(tmp, args.int8)
        print(f"bert_to_onnx: wrote {args.int8} (int8 weights, per-channel scales)")


if __name__ == "__main__":
    main()
