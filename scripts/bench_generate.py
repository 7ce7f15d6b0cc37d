#!/usr/bin/env python3
"""Generation benchmark: the in-process engine (single stream and batched) vs llama.cpp on the
same GGUF and the same prompts, in one run.

Two workloads of 16 chat requests each, greedy: "rewrite" asks for a short rewrite of the first
400 characters of a sample mail (the synthesis stages' shape: long prompts, <= 64 new tokens,
prefill-heavy); "stories" asks for a short story on a topic (short prompts, <= 128 new tokens,
decode-heavy). Timing covers prefill + decode of all requests (model load excluded on both
sides); tokens/s = generated tokens / wall seconds.

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
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_ingest as common  # noqa: E402  (machine, git_rev, write_section)
from bench_common import generate_rate  # noqa: E402

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


TOPICS = ["a lighthouse", "a lost key", "a rainy market", "a robot gardener", "a mountain train",
          "a library cat", "a paper boat", "a winter fox", "a clockmaker", "a desert well",
          "a city bridge", "a kite festival", "a night bakery", "a river otter", "a chess club",
          "a moon garden"]


def stories() -> list[str]:
    return [f"Write a short story about {t}." for t in TOPICS]


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


def ours(binary: str, batch: int, items: list[str], max_tokens: int) -> dict:
    stdin = "\n".join(json.dumps(p) for p in items) + "\n"
    return generate_rate(
        [binary, "generate", "--model", str(GGUF), "--batch", str(batch), "--max-tokens", str(max_tokens), "-"],
        stdin,
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--llama-python", required=True)
    args = ap.parse_args()
    mach = common.machine()
    lines = [
        "## Generation: in-process engine vs llama.cpp",
        "",
        f"SmolLM2-135M-Instruct Q4_1 GGUF, 16 chat prompts per workload, greedy; wall time of all requests "
        f"(prefill + decode, model load excluded). rewrite: a rewrite request over 400 characters of a sample "
        f"mail (~140 prompt tokens, <= {MAX_TOKENS} new tokens: the synthesis stages' shape, prefill-heavy); "
        f"stories: \"Write a short story about ...\" (~35 prompt tokens, <= 128 new tokens, decode-heavy). "
        f"{mach.get('cpu', '')}, 2 threads. Commit {common.git_rev()}.",
        "",
        "| workload | configuration | generated tokens | seconds | tokens/s | vs llama.cpp single | vs ours single |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    names = {
        "llama_single": "llama.cpp (llama-cpp-python 0.3.36), one sequence at a time",
        "ours_single": "safepipe in-process, one sequence at a time",
        "ours_batch8": "safepipe in-process, 8 sequences decoded together",
        "ours_batch16": "safepipe in-process, 16 sequences decoded together",
    }
    summary = []
    for workload, items, max_tokens in [("rewrite", prompts(), MAX_TOKENS), ("stories", stories(), 128)]:
        path = REPO / "target/bench-generate-prompts.json"
        path.write_text(json.dumps(items))
        results = {}
        results["ours_single"] = ours(args.bin, 1, items, max_tokens)
        run = subprocess.run([args.llama_python, "-c", LLAMA, str(GGUF), str(path), str(max_tokens)],
                             capture_output=True, text=True, check=True)
        results["llama_single"] = json.loads(run.stdout.strip().splitlines()[-1])
        results["ours_batch8"] = ours(args.bin, 8, items, max_tokens)
        results["ours_batch16"] = ours(args.bin, 16, items, max_tokens)
        rate = {k: v["tokens"] / v["seconds"] for k, v in results.items()}
        for k in ["llama_single", "ours_single", "ours_batch8", "ours_batch16"]:
            r = results[k]
            lines.append(
                f"| {workload} | {names[k]} | {r['tokens']} | {r['seconds']:.2f} | {rate[k]:.1f} | "
                f"{rate[k] / rate['llama_single']:.2f}x | {rate[k] / rate['ours_single']:.2f}x |"
            )
        summary.append(
            f"{workload}: single stream {rate['ours_single'] / rate['llama_single']:.2f}x llama.cpp, batched "
            f"{max(rate['ours_batch8'], rate['ours_batch16']) / rate['ours_single']:.2f}x our single stream"
        )
    lines += [
        "",
        "Targets: single stream >= 0.5x llama.cpp; batched >= 2x our single stream. Here: " + "; ".join(summary) + ".",
        "",
        "Reproduce: `make test-server` (builds llama-cpp-python into `.venv-llama`), then `make bench`, or",
        "```",
        "python3 scripts/bench_generate.py --bin target/debug/safepipe --out docs/BENCHMARKS.md --llama-python .venv-llama/bin/python",
        "```",
        "",
    ]
    body = "\n".join(lines)
    print(body)
    common.write_section(Path(args.out), body, START, END)


if __name__ == "__main__":
    main()
