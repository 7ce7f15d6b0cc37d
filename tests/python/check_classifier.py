#!/usr/bin/env python3
"""Oracle for the classifier: ONNX Runtime's Python API (and Python's `tokenizers`) on the same
chunks must give the logits `safepipe classifier score --chunks` printed.

usage: check_classifier.py MANIFEST SCORED_JSONL TEXTS_JSONL [--int8]
SCORED_JSONL is safepipe's output (one object per text, with chunk_detail); TEXTS_JSONL the texts
it scored (one JSON string per line). For every chunk: run the ONNX file of the manifest on the
chunk's ids, pool and apply the head as the manifest says, compare the logits; re-tokenize every
text and compare its ids with the concatenated chunk contents. Prints one JSON summary.
"""
import json
import os
import struct
import sys
import tomllib

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer


def read_head(path):
    """The head's layers as a function: the optional hidden layer (ReLU), then the output."""
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        data = f.read()
    t = {}
    for name, meta in header.items():
        if name != "__metadata__":
            a, b = meta["data_offsets"]
            t[name] = np.frombuffer(data[a:b], dtype=np.float32).reshape(meta["shape"])

    def apply(x):
        if "hidden.weight" in t:
            x = np.maximum(t["hidden.weight"] @ x + t["hidden.bias"], 0.0)
        return t["classifier.weight"] @ x + t["classifier.bias"]
    return apply


def main():
    manifest_path, scored_path, texts_path = sys.argv[1:4]
    int8 = "--int8" in sys.argv[4:]
    base = os.path.dirname(os.path.abspath(manifest_path))
    with open(manifest_path, "rb") as f:
        m = tomllib.load(f)
    model = os.path.join(base, m["onnx_int8"] if int8 else m["onnx"])
    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    tok = Tokenizer.from_file(os.path.join(base, m["tokenizer"]))
    tok.no_padding()
    tok.no_truncation()
    tok.encode_special_tokens = True  # as safepipe: "[SEP]" in a text is text
    names = m.get("inputs", {})
    kind = m.get("output_kind", "hidden_states")
    head = m.get("head")
    apply_head = read_head(os.path.join(base, head["path"])) if head else None

    scored = [json.loads(line) for line in open(scored_path)]
    texts = [json.loads(line) for line in open(texts_path)]
    assert len(scored) == len(texts), (len(scored), len(texts))
    max_diff, chunks, id_mismatches, score_mismatches = 0.0, 0, 0, 0
    for text, result in zip(texts, scored):
        detail = result["chunk_detail"]
        # Tokenization: the chunks' contents (specials stripped) must be this text's ids.
        special = set(tok.encode("probe", add_special_tokens=True).ids) - set(
            tok.encode("probe", add_special_tokens=False).ids)
        expected_ids = tok.encode(text, add_special_tokens=False).ids
        got = [i for c in detail for i in c["ids"] if i not in special]
        # (The CLI chunks without overlap, so the contents concatenate to the whole text.)
        if got != expected_ids:
            id_mismatches += 1
        worst = 0
        for c in detail:
            ids = np.array([c["ids"]], dtype=np.int64)
            feed = {names.get("input_ids", "input_ids"): ids,
                    names.get("attention_mask", "attention_mask"): np.ones_like(ids)}
            if names.get("token_type_ids"):
                feed[names["token_type_ids"]] = np.zeros_like(ids)
            out = session.run([m["output"]], feed)[0][0]
            if kind == "hidden_states":
                out = out.mean(axis=0) if m.get("pooling", "mean") == "mean" else out[0]
            if head:
                if head.get("normalize"):
                    out = out / np.linalg.norm(out)
                out = apply_head(out)
            max_diff = max(max_diff, float(np.abs(out - np.array(c["logits"])).max()))
            p = np.exp(out - out.max())
            p /= p.sum()
            worst = max(worst, m["scores"][int(np.argmax(p))])
            chunks += 1
        if detail and worst != result["score"]:
            score_mismatches += 1
    print(json.dumps({"texts": len(texts), "chunks": chunks, "max_logit_diff": max_diff,
                      "id_mismatches": id_mismatches, "score_mismatches": score_mismatches}))


if __name__ == "__main__":
    main()
