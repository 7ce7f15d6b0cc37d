#!/usr/bin/env python3
"""Decoding benchmark: our checkpoints under greedy, beam and Safe Beam Search.

The model is SmolLM2-135M-Instruct turned into a checkpoint as `safepipe train` writes them: the
GGUF that `make setup` fetches is dequantised (the `gguf` package), its Q and K rows put back in
Hugging Face's rotate-half order, and one row for the tag token appended to the tied embedding
(so the vocabulary is 49153, as in our pretraining runs; the row is the mean embedding: the tag is
never likely, which changes nothing in the cost). The tokenizer is the demo config's (`safepipe
tokenizer export`).

Workload: 8 completion prompts ("Once upon a time, ..."), <= 32 new tokens each, all decoded
together; `safepipe generate --checkpoint` at f32 and at Q8_0, for greedy, beam (4 beams) and
safe-beam (4 beams, 8 candidates); tokens/s = generated tokens / wall seconds of the decoding
(model load excluded; read from the line `safepipe generate` prints). With --llama-python (the
venv `make test-server` builds), llama.cpp's greedy decoding of the original GGUF on the same
prompts, one at a time, as the reference.

Writes the section between `<!-- bench:decode:start -->` / `end` in --out.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_ingest as common  # noqa: E402  (machine, git_rev, write_section)
from bench_common import generate_rate  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
START, END = "<!-- bench:decode:start -->", "<!-- bench:decode:end -->"
GGUF = REPO / "models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MAX_TOKENS, BATCH = 32, 8
SUBJECTS = ["a lighthouse keeper", "a lost key", "a rainy market", "a robot gardener", "a mountain train",
            "a library cat", "a paper boat", "a winter fox"]
PROMPTS = [f"Once upon a time, there was {s} who" for s in SUBJECTS]

LLAMA = r"""
import json, sys, time
from llama_cpp import Llama
prompts = json.load(open(sys.argv[2]))
m = Llama(model_path=sys.argv[1], n_ctx=2048, n_threads=2, n_batch=512, verbose=False)
m("warm up", max_tokens=4, temperature=0.0)
t = time.perf_counter(); tokens = 0
for p in prompts:
    r = m(p, max_tokens=int(sys.argv[3]), temperature=0.0)
    tokens += r["usage"]["completion_tokens"]
print(json.dumps({"tokens": tokens, "seconds": time.perf_counter() - t}))
"""


def convert(gguf_path: Path, out: Path, binary: str) -> None:
    """Writes a safepipe-train-shaped checkpoint of the GGUF into `out`."""
    import numpy as np
    import gguf

    reader = gguf.GGUFReader(str(gguf_path))
    field = lambda k: reader.fields[k].parts[reader.fields[k].data[0]][0].item()  # noqa: E731
    hidden, layers = field("llama.embedding_length"), field("llama.block_count")
    heads, kv_heads = field("llama.attention.head_count"), field("llama.attention.head_count_kv")
    head_dim = hidden // heads

    def tensor(name: str) -> np.ndarray:
        t = next(t for t in reader.tensors if t.name == name)
        return gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32).reshape(
            [int(d) for d in reversed(t.shape)])

    def rotate_half(w: np.ndarray, n_heads: int) -> np.ndarray:
        # Undo the converter's permutation: adjacent pairs back to halves, per head.
        return w.reshape(n_heads, head_dim // 2, 2, -1).swapaxes(1, 2).reshape(w.shape)

    embed = tensor("token_embd.weight")
    embed = np.concatenate([embed, embed.mean(axis=0, keepdims=True)])
    out_tensors = {"model.embed_tokens.weight": embed, "model.norm.weight": tensor("output_norm.weight")}
    names = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
             "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
             "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
             "ffn_down": "mlp.down_proj"}
    for i in range(layers):
        for ours, theirs in names.items():
            w = tensor(f"blk.{i}.{ours}.weight")
            if ours == "attn_q":
                w = rotate_half(w, heads)
            elif ours == "attn_k":
                w = rotate_half(w, kv_heads)
            out_tensors[f"model.layers.{i}.{theirs}.weight"] = np.ascontiguousarray(w)
    out.mkdir(parents=True, exist_ok=True)
    write_safetensors(out / "model.safetensors", out_tensors)
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": int(embed.shape[0]),
        "hidden_size": hidden, "intermediate_size": field("llama.feed_forward_length"),
        "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv_heads,
        "rope_theta": float(field("llama.rope.freq_base")),
        "rms_norm_eps": float(field("llama.attention.layer_norm_rms_epsilon")),
        "max_position_embeddings": field("llama.context_length"), "tie_word_embeddings": True,
        "bos_token_id": 0, "eos_token_id": 0,
    }
    (out / "config.json").write_text(json.dumps(config, indent=2))
    subprocess.run([binary, "tokenizer", "export", str(REPO / "configs/demo.toml"), "--out",
                    str(out / "tokenizer.json")], check=True, capture_output=True)


def write_safetensors(path: Path, tensors: dict) -> None:
    """The safetensors layout: an 8-byte little-endian header length, a JSON header of F32
    tensors with their byte offsets, then the data."""
    header, offset, blobs = {"__metadata__": {"format": "pt"}}, 0, []
    for name, array in tensors.items():
        blob = array.astype("<f4").tobytes()
        header[name] = {"dtype": "F32", "shape": list(array.shape), "data_offsets": [offset, offset + len(blob)]}
        offset += len(blob)
        blobs.append(blob)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for blob in blobs:
            f.write(blob)


def ours(binary: str, checkpoint: Path, precision: str, decoder: list[str]) -> dict:
    return generate_rate([binary, "generate", "--checkpoint", str(checkpoint), "--precision", precision,
                          "--max-tokens", str(MAX_TOKENS), "--batch", str(BATCH), *decoder, *PROMPTS])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--llama-python")
    a = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = Path(tmp) / "smollm2-135m"
        convert(GGUF, checkpoint, a.bin)
        if a.llama_python and Path(a.llama_python).exists():
            prompts = Path(tmp) / "prompts.json"
            prompts.write_text(json.dumps(PROMPTS))
            r = subprocess.run([a.llama_python, "-c", LLAMA, str(GGUF), str(prompts), str(MAX_TOKENS)],
                               capture_output=True, text=True, check=True)
            rows.append(("llama.cpp (llama-cpp-python), Q4_1 GGUF, one sequence at a time", "greedy",
                         json.loads(r.stdout.strip().splitlines()[-1])))
        for precision in ["f32", "q8_0"]:
            for name, flags in [("greedy", ["--decoder", "greedy"]),
                                ("beam, 4 beams", ["--decoder", "beam", "--beams", "4"]),
                                ("safe-beam, 4 beams x 8 candidates",
                                 ["--decoder", "safe-beam", "--beams", "4", "--candidates", "8"])]:
                result = ours(a.bin, checkpoint, precision, flags)
                rows.append((f"safepipe, checkpoint in {precision}, {BATCH} prompts together", name, result))
                print(precision, name, result, file=sys.stderr)
    speed = lambda r: r["tokens"] / max(r["seconds"], 1e-9)  # noqa: E731
    lines = [
        "## Decoding: our checkpoints under greedy, beam and Safe Beam Search", "",
        f"SmolLM2-135M-Instruct as a `safepipe train`-shaped checkpoint (the Q4_1 GGUF dequantised, "
        f"Q/K rows back in rotate-half order, a tag row appended: vocabulary 49153), {len(PROMPTS)} "
        f"completion prompts, <= {MAX_TOKENS} new tokens each; wall time of decoding (model load "
        f"excluded). {common.machine()['cpu']}, 2 threads. Commit {common.git_rev()}.", "",
        "| engine | decoder | generated tokens | seconds | tokens/s | seconds per token vs beam |",
        "|---|---|---:|---:|---:|---:|",
    ]
    beams = {engine: r for engine, name, r in rows if name.startswith("beam")}
    for engine, name, r in rows:
        ratio = f"{speed(beams[engine]) / max(speed(r), 1e-9):.2f}x" if engine in beams else ""
        lines.append(f"| {engine} | {name} | {r['tokens']} | {r['seconds']:.2f} | {speed(r):.1f} | {ratio} |")
    for engine in beams:
        safe = next(r for e, n, r in rows if e == engine and n.startswith("safe-beam"))
        lines.append("")
        lines.append(f"Safe Beam Search's cost over beam search ({engine}): "
                     f"{speed(beams[engine]) / max(speed(safe), 1e-9):.2f}x the time per generated "
                     f"token (target <= 1.5x).")
    lines += ["", "Reproduce: `make bench`, or",
              "```", "python3 scripts/bench_decode.py --bin target/debug/safepipe --out docs/BENCHMARKS.md "
              "[--llama-python .venv-llama/bin/python]", "```"]
    common.write_section(Path(a.out), "\n".join(lines) + "\n", START, END)


if __name__ == "__main__":
    main()
