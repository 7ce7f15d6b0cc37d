#!/usr/bin/env python3
"""Oracle for the trainer's model: the logits of our CPU backend on a checkpoint must equal an
independent numpy implementation of Hugging Face's LlamaForCausalLM forward (RMSNorm, rotate-half
RoPE, grouped-query causal attention, SwiGLU, tied head), and `transformers` itself when PyTorch
and transformers are installed (skipped cleanly otherwise).

usage: check_llama_parity.py CHECKPOINT_DIR CASE_JSON
CASE_JSON: {"rows": R, "seq_len": T, "tokens": [R*(T+1) ids], "logits": [R*T*V floats]}.
Reads model.safetensors with numpy (the safetensors layout: u64 header length, JSON header,
little-endian data). Prints one JSON summary; exits non-zero on a mismatch.
"""
import json
import struct
import sys

import numpy as np

TOLERANCE = 1e-4


def load_safetensors(path):
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        data = f.read()
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        assert info["dtype"] == "F32", info
        begin, end = info["data_offsets"]
        out[name] = np.frombuffer(data[begin:end], dtype="<f4").reshape(info["shape"]).astype(np.float64)
    return out


def numpy_logits(w, cfg, ids):
    d, heads, kv = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd, eps, theta = d // heads, cfg["rms_norm_eps"], cfg["rope_theta"]
    t = len(ids)

    def rms(x, g):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * g

    inv = theta ** (-np.arange(0, hd, 2) / hd)
    ang = np.arange(t)[:, None] * inv[None, :]
    cos = np.concatenate([np.cos(ang)] * 2, -1)[:, None, :]
    sin = np.concatenate([np.sin(ang)] * 2, -1)[:, None, :]

    def rope(x):
        rot = np.concatenate([-x[..., hd // 2:], x[..., : hd // 2]], -1)
        return x * cos + rot * sin

    x = w["model.embed_tokens.weight"][ids]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        h = rms(x, w[p + "input_layernorm.weight"])
        q = rope((h @ w[p + "self_attn.q_proj.weight"].T).reshape(t, heads, hd))
        k = rope((h @ w[p + "self_attn.k_proj.weight"].T).reshape(t, kv, hd))
        v = (h @ w[p + "self_attn.v_proj.weight"].T).reshape(t, kv, hd)
        k = np.repeat(k, heads // kv, axis=1)
        v = np.repeat(v, heads // kv, axis=1)
        scores = np.einsum("thd,shd->hts", q, k) / np.sqrt(hd)
        scores = np.where(np.tril(np.ones((t, t), bool))[None], scores, -np.inf)
        scores = np.exp(scores - scores.max(-1, keepdims=True))
        probs = scores / scores.sum(-1, keepdims=True)
        attn = np.einsum("hts,shd->thd", probs, v).reshape(t, d)
        x = x + attn @ w[p + "self_attn.o_proj.weight"].T
        h = rms(x, w[p + "post_attention_layernorm.weight"])
        gate = h @ w[p + "mlp.gate_proj.weight"].T
        up = h @ w[p + "mlp.up_proj.weight"].T
        x = x + ((gate / (1 + np.exp(-gate))) * up) @ w[p + "mlp.down_proj.weight"].T
    return rms(x, w["model.norm.weight"]) @ w["model.embed_tokens.weight"].T


def main():
    ckpt, case_path = sys.argv[1:3]
    cfg = json.load(open(f"{ckpt}/config.json"))
    case = json.load(open(case_path))
    rows, t, vocab = case["rows"], case["seq_len"], cfg["vocab_size"]
    ours = np.array(case["logits"], dtype=np.float64).reshape(rows, t, vocab)
    tokens = np.array(case["tokens"]).reshape(rows, t + 1)
    weights = load_safetensors(f"{ckpt}/model.safetensors")
    worst = max(float(np.abs(numpy_logits(weights, cfg, tokens[r, :t]) - ours[r]).max()) for r in range(rows))
    report = {"numpy_max_abs_diff": worst}
    assert worst < TOLERANCE, report
    try:
        import torch
        from transformers import LlamaForCausalLM
    except ImportError as e:
        report["transformers"] = f"skipped: {e}"
    else:
        model = LlamaForCausalLM.from_pretrained(ckpt, torch_dtype=torch.float32).eval()
        with torch.no_grad():
            theirs = model(torch.tensor(tokens[:, :t])).logits.double().numpy()
        report["transformers_max_abs_diff"] = float(np.abs(theirs - ours).max())
        assert report["transformers_max_abs_diff"] < TOLERANCE, report
    print(json.dumps(report))


if __name__ == "__main__":
    main()
