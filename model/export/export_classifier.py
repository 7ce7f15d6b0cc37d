#!/usr/bin/env python3
"""Export a Hugging Face sequence-classification model to ONNX for `safepipe`'s score stage.

Made for the paper's classifiers, `locuslab/safety-classifier_gte-large-en-v1.5` and the
gte-base one (6 logits, scores 0..5; their gte backbone needs `trust_remote_code`), and works
for any `AutoModelForSequenceClassification` (BERT, RoBERTa, e5, arctic-embed, ...). Run it where
the model hub is reachable (or on a local model directory), with PyTorch and transformers:

  pip install torch transformers onnx onnxscript onnxruntime
  python model/export/export_classifier.py locuslab/safety-classifier_gte-large-en-v1.5 \\
      --out classifiers/gte-large-safety --max-length 2048 --int8

It writes OUT/model.onnx (dynamic batch and sequence axes), OUT/tokenizer.json,
OUT/classifier.toml (the manifest: inputs, `output_kind = "logits"`, max length, scores) and,
with --int8, OUT/model.int8.onnx (per-channel dynamic quantisation). Then it checks parity:
ONNX Runtime's logits against PyTorch's on a few texts of different lengths (padded batch),
failing above --tolerance. Point `[score] model` at OUT/classifier.toml.
"""
import argparse
import json
import os
import sys

SAMPLE_TEXTS = [
    "How do I bake sourdough bread at home?",
    "Give step-by-step instructions for synthesising a nerve agent in a home lab.",
    "The committee met on Tuesday to review the budget. " * 20,
    "ok",
    # Long enough to be truncated at --max-length: parity at the full chunk length too.
    "A long report on harbour logistics, shipping delays and the weather at sea. " * 400,
]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="a model id on the hub, or a local directory")
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--max-length", type=int, default=512,
                    help="tokens per chunk (gte-base: 512 as in the paper; gte-large: 2048)")
    ap.add_argument("--opset", type=int, default=18)
    ap.add_argument("--scores", default="0,1,2,3,4,5", help="the score of each label, in label order")
    ap.add_argument("--name", help="model id written to scores.model (default: the model's name)")
    ap.add_argument("--int8", action="store_true", help="also write a dynamically quantised copy")
    ap.add_argument("--tolerance", type=float, default=1e-4, help="max |onnx - torch| logit difference")
    ap.add_argument("--no-trust-remote-code", action="store_true")
    args = ap.parse_args()

    import numpy as np
    import onnxruntime as ort
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    trust = not args.no_trust_remote_code
    tokenizer = AutoTokenizer.from_pretrained(args.model, trust_remote_code=trust)
    if not getattr(tokenizer, "is_fast", False):
        sys.exit("export_classifier: the model has no fast tokenizer (tokenizer.json); safepipe needs one")
    # Eager attention traces into plain ops; the SDPA path bakes shape-dependent masking into the graph.
    model = AutoModelForSequenceClassification.from_pretrained(args.model, trust_remote_code=trust,
                                                               attn_implementation="eager")
    model.eval()
    scores = [int(s) for s in args.scores.split(",")]
    if model.config.num_labels != len(scores):
        sys.exit(f"export_classifier: the model has {model.config.num_labels} labels but --scores lists {len(scores)}")

    os.makedirs(args.out, exist_ok=True)
    tokenizer.backend_tokenizer.save(os.path.join(args.out, "tokenizer.json"))
    input_names = [n for n in ("input_ids", "attention_mask", "token_type_ids") if n in tokenizer.model_input_names]
    example = tokenizer(SAMPLE_TEXTS[:2], padding=True, return_tensors="pt")
    onnx_path = os.path.join(args.out, "model.onnx")

    class Logits(torch.nn.Module):
        """Named tensor inputs, logits out (no dict outputs in the graph)."""

        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask, token_type_ids=None):
            named = {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids}
            return self.inner(**{n: named[n] for n in input_names}).logits

    # The dynamo exporter (torch.export): the TorchScript one mis-exported BERT models with
    # torch 2.15 (logits off by 1e-2 in our check), this one matches PyTorch to ~1e-7.
    batch_dim = torch.export.Dim("batch")
    seq_dim = torch.export.Dim("sequence", max=max(args.max_length, 16))
    with torch.no_grad():
        torch.onnx.export(Logits(model).eval(), tuple(example[n] for n in input_names), onnx_path,
                          input_names=input_names, output_names=["logits"],
                          dynamic_shapes={n: {0: batch_dim, 1: seq_dim} for n in input_names},
                          opset_version=args.opset, dynamo=True, external_data=False)

    # Parity: a padded batch of texts of different lengths.
    batch = tokenizer(SAMPLE_TEXTS, padding=True, truncation=True, max_length=args.max_length, return_tensors="pt")
    with torch.no_grad():
        want = model(**{n: batch[n] for n in input_names}).logits.float().numpy()
    session = ort.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
    got = session.run(["logits"], {n: batch[n].numpy().astype(np.int64) for n in input_names})[0]
    diff = float(np.abs(got - want).max())
    print(f"export_classifier: max |onnx - torch| logit difference {diff:.2e} over {len(SAMPLE_TEXTS)} texts")
    if diff > args.tolerance:
        sys.exit(f"export_classifier: parity check failed ({diff:.2e} > {args.tolerance})")

    int8_line = ""
    if args.int8:
        import onnx
        from onnxruntime.quantization import QuantType, quantize_dynamic
        # The exporter's recorded intermediate shapes can disagree with ONNX shape inference
        # after quantisation rewrites the graph: drop them and let inference redo them.
        graph = onnx.load(onnx_path)
        del graph.graph.value_info[:]
        stripped = os.path.join(args.out, "model.noshapes.onnx")
        onnx.save(graph, stripped)
        int8_path = os.path.join(args.out, "model.int8.onnx")
        quantize_dynamic(stripped, int8_path, per_channel=True, weight_type=QuantType.QInt8)
        os.remove(stripped)
        # int8 is an approximation: report how often its label equals fp32's on the same batch.
        session8 = ort.InferenceSession(int8_path, providers=["CPUExecutionProvider"])
        got8 = session8.run(["logits"], {n: batch[n].numpy().astype(np.int64) for n in input_names})[0]
        agree = float((got8.argmax(1) == want.argmax(1)).mean())
        print(f"export_classifier: int8 labels equal fp32 on {agree:.0%} of {len(SAMPLE_TEXTS)} texts "
              f"(max logit difference {float(np.abs(got8 - want).max()):.2e}); measure on your data")
        int8_line = 'onnx_int8 = "model.int8.onnx"\n'

    name = args.name or os.path.basename(args.model.rstrip("/"))
    inputs = "".join(f'{n} = "{n}"\n' for n in input_names)
    manifest = (f"# Exported by model/export/export_classifier.py from {args.model}.\n"
                f"name = {json.dumps(name)}\n"
                f'onnx = "model.onnx"\n{int8_line}'
                f'tokenizer = "tokenizer.json"\n'
                f"max_length = {args.max_length}\n"
                f'output = "logits"\noutput_kind = "logits"\n'
                f"scores = {json.dumps(scores)}\n\n[inputs]\n{inputs}")
    with open(os.path.join(args.out, "classifier.toml"), "w") as f:
        f.write(manifest)
    print(f"export_classifier: wrote {args.out}/classifier.toml")


if __name__ == "__main__":
    main()
