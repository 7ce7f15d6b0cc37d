#!/usr/bin/env python3
"""CPU training benchmark: the trainer's blocked kernels against the reference loops.

Builds a small run (the sample's ham, HarmBench and StrongREJECT, no scoring: ingest, route,
tag, tokenize, pack into rows of 2048 + 1 tokens), then trains each model shape for a few steps
with `train.kernels = "reference"` and `"blocked"`, reading the achieved tokens/s and GFLOP/s of
the last step from the log (the first steps warm the allocator and the page cache).

Writes the section between `<!-- bench:train:start -->` / `end` in --out.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_ingest as common  # noqa: E402  (machine, git_rev, write_section)

REPO = Path(__file__).resolve().parent.parent
START, END = "<!-- bench:train:start -->", "<!-- bench:train:end -->"
GGUF = REPO / "models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
# (preset, steps, micro_batch): enough steps that the last one is warm.
SHAPES = [("tiny", 4, 1), ("smollm2-135m", 2, 1)]


def config(tmp: Path, preset: str, steps: int, micro_batch: int, kernels: str) -> Path:
    inputs = "".join(
        f'[[inputs]]\nname = "{name}"\npaths = ["{REPO / "data/sample" / file}"]\n\n'
        for name, file in [("ham", "spamassassin-ham.jsonl"), ("harmbench", "harmbench.parquet"),
                           ("strongreject", "strongreject.jsonl.zst")]
    )
    text = (
        f'run_dir = "{tmp / "run"}"\n\n{inputs}'
        "[[route.rules]]\nname = \"harmful\"\nwhen = \"source IN ('harmbench', 'strongreject')\"\nroute = \"tag\"\n\n"
        f'[tokenize]\ntokenizer = "{GGUF}"\n\n[pack]\nseq_len = 2048\n\n'
        f'[train]\nmodel = "{preset}"\ncheckpoint_dir = "{tmp / ("ckpt-" + preset + "-" + kernels)}"\n'
        f'steps = {steps}\nmicro_batch = {micro_batch}\nlr = 0.001\nkernels = "{kernels}"\n'
    )
    path = tmp / f"{preset}-{kernels}.toml"
    path.write_text(text)
    return path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", required=True)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        subprocess.run([a.bin, "run", str(config(tmp, "tiny", 1, 1, "reference"))], check=True,
                       capture_output=True)
        for preset, steps, micro_batch in SHAPES:
            for kernels in ["reference", "blocked"]:
                run = subprocess.run([a.bin, "train", str(config(tmp, preset, steps, micro_batch, kernels))],
                                     capture_output=True, text=True, check=True)
                last = [l for l in run.stderr.splitlines() if "step=" in l and "gflops=" in l][-1]
                tps = float(re.search(r'tokens_per_second="([\d.]+)"', last).group(1))
                gflops = float(re.search(r'gflops="([\d.]+)"', last).group(1))
                rows.append((preset, kernels, tps, gflops))
                print(preset, kernels, tps, gflops, file=sys.stderr)
    lines = [
        "## CPU training: blocked kernels vs the reference loops", "",
        f"`safepipe train` on the sample's shards (rows of 2048 + 1 tokens, micro-batch 1, document "
        f"masks), the last of a few steps; GFLOP/s counts 6N + attention per token as the trainer logs "
        f"it. {common.machine()['cpu']}, 2 threads. Commit {common.git_rev()}.", "",
        "| model | kernels | tokens/s | GFLOP/s | vs reference |",
        "|---|---|---:|---:|---:|",
    ]
    for preset, kernels, tps, gflops in rows:
        ref = next(r for r in rows if r[0] == preset and r[1] == "reference")
        lines.append(f"| {preset} | {kernels} | {tps:.0f} | {gflops:.1f} | {tps / ref[2]:.2f}x |")
    lines += ["", "Reproduce: `make bench`, or",
              "```", "python3 scripts/bench_train.py --bin target/debug/safepipe --out docs/BENCHMARKS.md", "```"]
    common.write_section(Path(a.out), "\n".join(lines) + "\n", START, END)


if __name__ == "__main__":
    main()
