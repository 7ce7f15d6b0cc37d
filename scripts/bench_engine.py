#!/usr/bin/env python3
"""Engine benchmark: what the commit protocol costs per unit, and how fast the read-only commands
answer, on a corpus split into many small units.

Used by `make bench` (and to compare two builds):

    .venv/bin/python scripts/bench_engine.py --bin target/debug/safepipe --out docs/BENCHMARKS.md \
        [--baseline OTHER_SAFEPIPE --baseline-label 21490c9]

The corpus is data/sample/spamassassin-ham.jsonl repeated K times (ids suffixed `#k`), planned in
units of 256 KiB (a few hundred units), through ingest, route, tag, tokenize (the SmolLM2
tokenizer from models/) and pack, jobs = 2. Per binary, each repetition in a fresh run
directory: `run` (everything), `run` again (nothing to do), `status`, and
`sql "SELECT count(*) FROM documents"`. Repetitions are interleaved between the binaries, and
their shards are checked to hold the same tokens (the engine may change how files are named and
committed, never what they hold).

The section between `<!-- bench:engine:start -->` and `<!-- bench:engine:end -->` of --out is
replaced (or appended).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SAMPLE = REPO / "data" / "sample" / "spamassassin-ham.jsonl"
GGUF = REPO / "models" / "smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
START = "<!-- bench:engine:start -->"
END = "<!-- bench:engine:end -->"

CONFIG = """\
run_dir = "{run_dir}"

[[inputs]]
name = "bench"
paths = ["{corpus}"]

[plan]
jsonl_unit_bytes = 262144

[[route.rules]]
name = "short"
when = "length(trim(text)) < 200"
route = "tag"

[tokenize]
tokenizer = "{gguf}"

[pack]
seq_len = 2047
shard_sequences = 512

[runner]
jobs = 2
"""


def timed(cmd: list[str]) -> tuple[float, str]:
    t = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True)
    elapsed = time.perf_counter() - t
    if out.returncode != 0:
        sys.exit(f"{cmd} failed:\n{out.stderr[-3000:]}")
    return elapsed, out.stderr


def shard_tokens(bin_: str, config: Path) -> str:
    out = subprocess.run(
        [bin_, "sql", str(config), "SELECT count(*) AS rows, sum(cardinality(input_ids)) AS tokens, "
         "sum(input_ids[1]) AS first_ids FROM shards", "--format", "json"],
        capture_output=True, text=True, check=True)
    return out.stdout.strip()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin", required=True)
    ap.add_argument("--label", default=None, help="name of --bin in the table (default: git describe)")
    ap.add_argument("--baseline", help="another safepipe binary to compare with")
    ap.add_argument("--baseline-label", default="baseline")
    ap.add_argument("--copies", type=int, default=4)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    label = args.label or subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO,
                                         capture_output=True, text=True).stdout.strip()
    binaries = [(label, str(Path(args.bin).resolve()))]
    if args.baseline:
        binaries.append((args.baseline_label, str(Path(args.baseline).resolve())))
    work = Path(tempfile.mkdtemp(prefix="safepipe-bench-engine-"))
    corpus = work / "corpus.jsonl"
    lines = SAMPLE.read_text().splitlines()
    with corpus.open("w") as f:
        for k in range(args.copies):
            for line in lines:
                if not line.strip():
                    continue
                doc = json.loads(line)
                doc["id"] = f"{doc.get('id', '')}#{k}"
                f.write(json.dumps(doc) + "\n")
    size_mb = corpus.stat().st_size / 1e6

    results: dict[str, dict[str, list[float]]] = {name: {} for name, _ in binaries}
    units = {}
    shards = {}
    for rep in range(args.reps):
        for name, bin_ in binaries:
            run_dir = work / f"{name}-{rep}"
            config = work / f"{name}-{rep}.toml"
            config.write_text(CONFIG.format(run_dir=run_dir, corpus=corpus, gguf=GGUF))
            r = results[name]
            r.setdefault("run (all stages)", []).append(timed([bin_, "run", str(config)])[0])
            r.setdefault("run again (no work)", []).append(timed([bin_, "run", str(config)])[0])
            r.setdefault("status", []).append(timed([bin_, "status", str(config)])[0])
            r.setdefault("sql count(*)", []).append(
                timed([bin_, "sql", str(config), "SELECT count(*) FROM documents"])[0])
            plan = json.loads((run_dir / "plan.json").read_text())
            units[name] = len(plan["units"])
            shards.setdefault(name, set()).add(shard_tokens(bin_, config))
            shutil.rmtree(run_dir)
    same = len({s for v in shards.values() for s in v}) == 1

    names = [n for n, _ in binaries]
    per_unit_ms = None
    if len(names) == 2:
        a, b = (statistics.median(results[n]["run (all stages)"]) for n in names)
        per_unit_ms = (a - b) * 1000 / (units[names[0]] * 5)
    rows = []
    for what in results[names[0]]:
        cells = [f"{statistics.median(results[n][what]):.2f}" for n in names]
        ratio = ""
        if len(names) == 2:
            a, b = (statistics.median(results[n][what]) for n in names)
            ratio = f"{b / a:.2f}x"
        rows.append(f"| {what} | " + " | ".join(cells) + (f" | {ratio} |" if ratio else " |"))
    head = "| command | " + " | ".join(f"{n} s (median)" for n in names) + (" | baseline / this |" if len(names) == 2 else "")
    sep = "|---|" + "---:|" * len(names) + ("---:|" if len(names) == 2 else "")
    cpu = platform.processor() or platform.machine()
    load = os.getloadavg()[0]
    section = "\n".join([
        START,
        "## Engine: the commit protocol per unit, and read-only commands",
        "",
        f"Measured {_dt.date.today()} on {os.cpu_count()} CPUs ({cpu}), load average {load:.2f} at the start. "
        f"Corpus: `spamassassin-ham.jsonl` x {args.copies} ({size_mb:.1f} MB) in {units[names[0]]} units of 256 KiB; "
        "ingest, route, tag, tokenize, pack; jobs = 2. Median of "
        f"{args.reps} interleaved repetitions, each in a fresh run directory.",
        "",
        head,
        sep,
        *rows,
        "",
        "- Shards of every run hold the same tokens: " + ("yes." if same else "**NO** (see the script's output)."),
        *([f"- Per (stage, unit): {per_unit_ms:+.1f} ms for {label} against {args.baseline_label} "
           f"({units[names[0]]} units x 5 stages), the commit protocol's fixed cost."] if per_unit_ms is not None else []),
        "- `run (all stages)` is the whole pipeline; `run again` judges every unit of every stage and does "
        "nothing; `status` predicts the next run from the same rule; `sql` registers every committed file.",
        "",
        "Command:",
        "",
        "```",
        f".venv/bin/python scripts/bench_engine.py --bin target/debug/safepipe --out docs/BENCHMARKS.md"
        + (f" --baseline OTHER_BINARY --baseline-label {args.baseline_label}" if args.baseline else ""),
        "```",
        END,
    ])
    print(section)
    out = Path(args.out)
    text = out.read_text() if out.exists() else "# Benchmarks\n"
    if START in text and END in text:
        text = text[: text.index(START)] + section + text[text.index(END) + len(END):]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    out.write_text(text)
    shutil.rmtree(work)
    if not same:
        sys.exit(f"the shards differ between runs: {shards}")


if __name__ == "__main__":
    main()
