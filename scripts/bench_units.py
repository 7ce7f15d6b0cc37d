#!/usr/bin/env python3
"""Metadata at scale: how fast the engine's commands answer on a run directory of many units.

    .venv/bin/python scripts/bench_units.py --bin target/debug/safepipe --units 100000 \
        --dir /scratch/units [--run-dir s3://bucket/units] [--keep] [--out docs/BENCHMARKS.md]

Writes one JSON Lines corpus of `--units` x 5 records (~0.8 KB of text each, cut from
data/sample/spamassassin-ham.jsonl, ids unique), plans it with `plan.jsonl_unit_bytes = 4096`
(one unit per ~5 records), and runs the stages ingest, route and tag. Then it times, each with
its peak resident memory (GNU time): `plan`, the first `run`, a no-op `run`, `status`,
`sql "SELECT count(*) FROM documents"` and `gc --dry-run`. The count is checked against the
corpus. With `--reuse`, an existing run directory is not rebuilt (only the read-side commands
are timed): a first run at 100,000 units takes ~12 minutes on 2 cores. With `--s3`, the run
directory is then copied to a local moto S3 server (it is relocatable) and the read-side commands
are timed there too.

The section between `<!-- bench:units:start -->` and `<!-- bench:units:end -->` of --out is
replaced (or appended) when --out is given.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SAMPLE = REPO / "data" / "sample" / "spamassassin-ham.jsonl"
START = "<!-- bench:units:start -->"
END = "<!-- bench:units:end -->"
RECORDS_PER_UNIT = 5

CONFIG = """\
run_dir = "{run_dir}"

[[inputs]]
name = "units"
paths = ["{corpus}"]

[plan]
jsonl_unit_bytes = 4096

[[route.rules]]
name = "short"
when = "length(trim(text)) < 400"
route = "tag"

[runner]
jobs = 2
"""


def write_corpus(path: Path, records: int) -> None:
    texts = [json.loads(line)["text"] for line in SAMPLE.open(encoding="utf-8")]
    with path.open("w", encoding="utf-8") as out:
        for i in range(records):
            text = texts[i % len(texts)]
            start = (i * 37) % max(1, len(text) - 800)
            record = {"id": f"u{i}", "text": text[start : start + 800] or "empty"}
            out.write(json.dumps(record) + "\n")


def timed(bin_: str, args: list[str], env: dict[str, str]) -> tuple[float, int, str, str]:
    """(wall seconds, peak MiB, stdout, stderr) of one command under GNU time."""
    cmd = ["/usr/bin/time", "-f", "TIME %e %M", bin_, *args]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        sys.exit(f"{args} failed ({out.returncode}):\n{out.stderr[-3000:]}")
    match = re.findall(r"^TIME ([0-9.]+) ([0-9]+)$", out.stderr, re.M)
    seconds, kib = match[-1]
    return float(seconds), int(kib) // 1024, out.stdout, out.stderr


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin", required=True)
    ap.add_argument("--units", type=int, default=100_000)
    ap.add_argument("--dir", required=True, help="folder for the corpus, config (and run directory)")
    ap.add_argument("--run-dir", help="run directory (default: DIR/run; an s3:// URL works)")
    ap.add_argument("--reuse", action="store_true", help="time the read-side commands only")
    ap.add_argument("--out", help="markdown file whose bench:units section is replaced")
    ap.add_argument(
        "--s3",
        action="store_true",
        help="then copy the run directory to a local moto S3 server and time the read-side commands there",
    )
    args = ap.parse_args()

    work = Path(args.dir)
    work.mkdir(parents=True, exist_ok=True)
    corpus = work / "corpus.jsonl"
    records = args.units * RECORDS_PER_UNIT
    if not (args.reuse and corpus.exists()):
        write_corpus(corpus, records)
    run_dir = args.run_dir or str(work / "run")
    config = work / "units.toml"
    config.write_text(CONFIG.format(run_dir=run_dir, corpus=corpus))
    env = dict(os.environ, RUST_LOG="warn")
    bin_ = str(Path(args.bin).resolve())
    rows: list[tuple[str, float, int]] = []

    def step(label: str, cmd: list[str]) -> str:
        seconds, mib, stdout, _ = timed(bin_, cmd, env)
        rows.append((label, seconds, mib))
        print(f"{label}: {seconds:.1f} s, {mib} MiB", flush=True)
        return stdout

    if not args.reuse:
        step("`plan`", ["plan", str(config)])
        step("first `run`", ["run", str(config)])
    step("no-op `run`", ["run", str(config)])
    step("`status`", ["status", str(config)])
    count = step("`sql \"SELECT count(*) FROM documents\"`",
                 ["sql", str(config), "SELECT count(*) AS n FROM documents", "--format", "csv"])
    n = int(count.strip().splitlines()[-1])
    if n != records:
        sys.exit(f"documents holds {n} rows, the corpus {records}")
    step("`gc --dry-run`", ["gc", str(config), "--dry-run"])

    if args.s3:
        s3_rows = on_s3(bin_, work, Path(run_dir), corpus, records, env)
        rows.extend(s3_rows)

    units = sum(1 for _ in open(corpus, "rb")) // RECORDS_PER_UNIT
    table = "\n".join(f"| {label} | {seconds:.1f} | {mib} MiB |" for label, seconds, mib in rows)
    section = f"""{START}
## A run directory with {units:,} units (`scripts/bench_units.py`)

Measured {_dt.date.today()} on {os.cpu_count()} CPUs ({platform.processor() or platform.machine()}),
run directory `{'s3' if run_dir.startswith('s3://') else 'local disk'}`: {records:,} JSON Lines records
planned with `plan.jsonl_unit_bytes = 4096`, stages ingest, route and tag; wall time and peak
resident memory from GNU time. `{Path(args.bin).name}` {git_head()}.

| command | seconds | peak memory |
|---|---:|---:|
{table}

Command: `.venv/bin/python scripts/bench_units.py --bin {args.bin} --units {args.units} --dir DIR`
{END}"""
    print(section)
    if args.out:
        replace_section(Path(args.out), section)


def on_s3(bin_: str, work: Path, local_run: Path, corpus: Path, records: int, env: dict) -> list:
    """Uploads the local run directory to a moto S3 server as it is (run directories are
    relocatable) and times the read-side commands against it; the no-op run's `storage:` line
    gives the requests it sent."""
    import concurrent.futures

    from bench_common import local_s3

    rows = []
    with local_s3("units", env) as (s3_env, client):
        files = [p for p in local_run.rglob("*") if p.is_file()]
        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            list(pool.map(lambda p: client.upload_file(str(p), "units", "run/" + str(p.relative_to(local_run))), files))
        print(f"uploaded {len(files):,} files to S3", flush=True)
        config = work / "units_s3.toml"
        config.write_text(CONFIG.format(run_dir="s3://units/run", corpus=corpus))
        for label, cmd in [
            # The copy's record files have new ETags: the first run reads every record and
            # writes new snapshots; the second is the steady state.
            ("first `run` on the copy, S3", ["run", str(config)]),
            ("no-op `run`, S3", ["run", str(config)]),
            ("`status`, S3", ["status", str(config)]),
            ("`sql \"SELECT count(*) FROM documents\"`, S3", ["sql", str(config), "SELECT count(*) AS n FROM documents", "--format", "csv"]),
            ("`gc --dry-run`, S3", ["gc", str(config), "--dry-run"]),
        ]:
            seconds, mib, stdout, stderr = timed(bin_, cmd, s3_env)
            storage = [l for l in stderr.splitlines() if "sent to object stores" in l]
            if storage:
                label += f" ({storage[0].removeprefix('storage: ').removesuffix(' sent to object stores')})"
            if "count(*)" in label and int(stdout.strip().splitlines()[-1]) != records:
                sys.exit(f"documents on S3 holds the wrong count: {stdout}")
            rows.append((label, seconds, mib))
            print(f"{label}: {seconds} s", flush=True)
    return rows


def git_head() -> str:
    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO)
    return out.stdout.strip()


def replace_section(path: Path, section: str) -> None:
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    if START in text and END in text:
        head, rest = text.split(START, 1)
        text = head + section + rest.split(END, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    path.write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
