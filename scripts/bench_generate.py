#!/usr/bin/env python3
"""Generation benchmark: the in-process engine (single stream and batched) vs llama.cpp on the
same GGUF and the same prompts, in one run.

Prompts: 16 chat requests asking for a short rewrite of the first 400 characters of sample
documents (the synthesis stages' shape), greedy, at most 64 new tokens each. Timing covers
prefill + decode of all requests (model load excluded on both sides); tokens/s = generated
tokens / wall seconds.

- safepipe: `safepipe generate --batch 1` (one sequence at a time) and `--batch 16` (all decoded
  together), reading the tokens/s line it prints.
- llama.cpp: llama-cpp-python's `create_chat_completion`, one request after another (its Python
  API and server decode one sequence at a time), 2 threads, in `--llama-python` (the venv that
  `make test-server` builds).

Writes the section between the `<!-- bench:generate:start -->` / `end` markers of --out.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_ingest as common  # noqa: E402  (machine, git_rev, write_section)

REPO = Path(__file__).resolve().parent.parent
START, END = "<!-- bench:generate:start -->", "<!-- bench:generate:end -->"
GGUF = REPO / "models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MAX_TOKENS, PROMPTS = 64, 16

LLAMA = r"""
import json, sys, time
from llama_cpp import Llama
prompts = json.load(open(sys.argv[2]))
m = Llama(model_path=sys.argv[1], n_ctx=2048, n_threads=2, n_batch=512, verbose=False)
m.create_chat_completion(messages=[{"role": "user", "content": "warm up"}], max_tokens=4, temperature=0.0)
t = time.perf_counter(); tokens = 0
for p in prompts:
    r = m.create_chat_completion(messages=[{"role": "user", "content": p}], max_tokens=int(sys.argv[3]), temperature=0.0)
    tokens += r["usage"]["completion_tokens"]
dt = time.perf_counter() - t
print(json.dumps({"tokens": tokens, "seconds": dt}))
"""


def prompts() -> list[str]:
    out = []
    with open(REPO / "data/sample/spamassassin-ham.jsonl") as f:
        for line in f:
            text = json.loads(line).get("text", "")
            body = " ".join(text.split())[:400]
            if len(body) > 200:
                out.append(f"Rewrite this message as two calm, plain sentences:\n\n{body}")
            if len(out) == PROMPTS:
                return out
    return out


def ours(binary: str, batch: int, items: list[str]) -> dict:
    stdin = "\n".join(json.dumps(p) for p in items) + "\n"
    run = subprocess.run(
        [binary, "generate", "--model", str(GGUF), "--batch", str(batch), "--max-tokens", str(MAX_TOKENS), "-"],
        input=stdin, capture_output=True, text=True, check=True,
    )
    m = re.search(r"(\d+) tokens in ([\d.]+)s", run.stderr)
    return {"tokens": int(m.group(1)), "seconds": float(m.group(2))}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--llama-python", required=True)
    args = ap.parse_args()
    items = prompts()
    path = REPO / "target/bench-generate-prompts.json"
    path.write_text(json.dumps(items))
    results = {}
    # Interleaved: ours single, llama.cpp, ours batched (one round; the VM is noisy).
    results["ours_single"] = ours(args.bin, 1, items)
    run = subprocess.run([args.llama_python, "-c", LLAMA, str(GGUF), str(path), str(MAX_TOKENS)],
                         capture_output=True, text=True, check=True)
    results["llama_single"] = json.loads(run.stdout.strip().splitlines()[-1])
    results["ours_batch8"] = ours(args.bin, 8, items)
    results["ours_batch16"] = ours(args.bin, 16, items)
    rate = {k: v["tokens"] / v["seconds"] for k, v in results.items()}
    mach = common.machine()
    lines = [
        "## Generation: in-process engine vs llama.cpp",
        "",
        f"SmolLM2-135M-Instruct Q4_1 GGUF, {len(items)} chat prompts (a rewrite request over 400 characters of a "
        f"sample mail, ~140 prompt tokens), greedy, <= {MAX_TOKENS} new tokens each; wall time of all requests "
        f"(prefill + decode, model load excluded). {mach.get('cpu', '')}, 2 threads. Commit {common.git_rev()}.",
        "",
        "| configuration | generated tokens | seconds | tokens/s | vs llama.cpp single | vs ours single |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    names = {
        "llama_single": "llama.cpp (llama-cpp-python 0.3.36), one sequence at a time",
        "ours_single": "safepipe in-process, one sequence at a time",
        "ours_batch8": "safepipe in-process, 8 sequences decoded together",
        "ours_batch16": "safepipe in-process, 16 sequences decoded together",
    }
    for k in ["llama_single", "ours_single", "ours_batch8", "ours_batch16"]:
        r = results[k]
        lines.append(
            f"| {names[k]} | {r['tokens']} | {r['seconds']:.2f} | {rate[k]:.1f} | "
            f"{rate[k] / rate['llama_single']:.2f}x | {rate[k] / rate['ours_single']:.2f}x |"
        )
    lines += [
        "",
        f"Targets: single stream >= 0.5x llama.cpp (here {rate['ours_single'] / rate['llama_single']:.2f}x); batched "
        f">= 2x our single stream (here {max(rate['ours_batch8'], rate['ours_batch16']) / rate['ours_single']:.2f}x).",
        "",
        "Reproduce: `make test-server` (builds llama-cpp-python into `.venv-llama`), then `make bench`, or",
        "```",
        f"python3 scripts/bench_generate.py --bin target/debug/safepipe --out docs/BENCHMARKS.md --llama-python .venv-llama/bin/python",
        "```",
        "",
    ]
    body = "\n".join(lines)
    print(body)
    common.write_section(Path(args.out), body, START, END)


if __name__ == "__main__":
    main()
