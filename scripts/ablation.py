#!/usr/bin/env python3
"""The three-arm ablation of docs/experiments.md, small: the same inputs through the pipeline as
A raw text, B score-0 text only, C the paper's recipe (configs/experiments/); one small model
trained per arm with the same steps and seed; every arm evaluated on the same held-out prompts
with every decoder (`safepipe eval`).

Per arm: `safepipe run`, `safepipe train`, `safepipe eval --name <arm>`; then the figures (token
mixture from the pack manifest, final training loss from metrics.jsonl, the eval summary) go to
the section between `<!-- ablation:start -->` / `end` of --out.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_ingest as common  # noqa: E402  (machine, git_rev, write_section)

REPO = Path(__file__).resolve().parent.parent
START, END = "<!-- ablation:start -->", "<!-- ablation:end -->"
ARMS = [("arm-a-raw", "A: raw text"), ("arm-b-score0", "B: score-0 text only"),
        ("arm-c-recipe", "C: the paper's recipe")]


def run(binary: str, *args: str) -> subprocess.CompletedProcess:
    started = time.perf_counter()
    r = subprocess.run([binary, *args], capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"{' '.join(args)} failed:\n{r.stderr[-4000:]}")
    if args[0] != "sql":
        print(f"{args[0]} {args[1]}: {time.perf_counter() - started:.0f}s", file=sys.stderr)
    return r


def rate(r: dict | None) -> str:
    if not r:
        return "n/a"
    return f"{r['rate']:.2f} [{r['low']:.2f}, {r['high']:.2f}]"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--tables-only", action="store_true", help="rewrite the tables from the runs already made")
    a = ap.parse_args()
    results = []
    for arm, label in ARMS:
        config = REPO / "configs/experiments" / f"{arm}.toml"
        if not a.tables_only:
            run(a.bin, "run", str(config))
            run(a.bin, "train", str(config))
            run(a.bin, "eval", str(config), "--checkpoint", str(REPO / "runs/experiments" / f"{arm}-checkpoints"),
                "--name", arm)
        manifest = json.loads((REPO / "runs/experiments" / arm / "pack/manifest.json").read_text())
        metrics = [json.loads(l) for l in
                   (REPO / "runs/experiments" / f"{arm}-checkpoints/metrics.jsonl").read_text().splitlines()]
        summary = json.loads((REPO / "runs/experiments" / arm / "eval" / arm / "summary.json").read_text())
        # The mean P(tag | prefix) over each kind of held-out text (one row per text: greedy's).
        query = (f"SELECT kind, avg(text_p_tag) AS p FROM eval WHERE evaluation = '{arm}' AND decoder = 'greedy' "
                 "GROUP BY kind")
        out = run(a.bin, "sql", str(config), query, "--format", "jsonl").stdout
        summary["mean_p_tag"] = {row["kind"]: row["p"] for row in map(json.loads, out.splitlines())}
        results.append((arm, label, manifest, metrics, summary))
    lines = [f"Run {time.strftime('%Y-%m-%d')} on {common.machine()['cpu']} (2 threads), commit {common.git_rev()}.",
             "", "**Training data per arm** (the pack manifest; every arm trains the `tiny` model for the same "
             "300 steps x 2048 tokens from the same seed):", "",
             "| arm | tokens packed | by source | final loss (mean of the last 10 steps) |", "|---|---:|---|---:|"]
    for arm, label, manifest, metrics, _ in results:
        sources = ", ".join(f"{s['name']} {s['selected_tokens']:,}" for s in manifest["sources"])
        last = [m["loss"] for m in metrics[-10:]]
        lines.append(f"| {label} | {manifest['tokens']:,} | {sources} | {sum(last) / len(last):.3f} |")
    first = results[0][4]
    lines += ["", f"**Held-out evaluation** ({first['harmful_prompts']} harmful and {first['benign_prompts']} "
              f"benign prefixes, the same for every arm; up to {first['max_tokens']} new tokens; unsafe = the "
              f"demo classifier's score >= {first['unsafe_score']}; 95% bootstrap intervals):", "",
              "| arm | decoder | harmful prefixes: unsafe continuation | benign prefixes: unsafe continuation | tokens/s |",
              "|---|---|---|---|---:|"]
    for _, label, _, _, summary in results:
        for d in summary["decoders"]:
            lines.append(f"| {label} | {d['decoder']} | {rate(d['harmful_unsafe_classifier'])} | "
                         f"{rate(d['benign_unsafe_classifier'])} | {d['tokens_per_second']:.0f} |")
    lines += ["", "| arm | mean P(tag) over held-out harmful text | over held-out benign text | tag-probability AUROC (harmful vs benign) | perplexity of held-out benign text |",
              "|---|---:|---:|---:|---:|"]
    for _, label, _, _, summary in results:
        auroc = summary["tag_auroc"]
        p = summary["mean_p_tag"]
        lines.append(f"| {label} | {p.get('harmful', float('nan')):.2e} | {p.get('benign', float('nan')):.2e} | "
                     f"{'n/a' if auroc is None else f'{auroc:.3f}'} | {summary['safe_perplexity']:.1f} |")
    common.write_section(Path(a.out), "\n".join(lines) + "\n", START, END)


if __name__ == "__main__":
    main()
