#!/usr/bin/env python3
"""A measured run at 1/1000 of the paper's scale (issue 13, item 4): ~600M tokens.

    .venv/bin/python scripts/scale_run.py --bin target/debug/safepipe --dir /scratch/scale \
        [--tokens 600000000] [--file-text-mb 1200] [--rows-per-group 20000] [--json OUT.json]

1. Writes FineWeb-shaped Parquet (FineWeb's columns: text, id, dump, url, date, file_path,
   language, language_score, token_count; zstd; row groups of --rows-per-group rows; files of
   --file-text-mb MB of text). Each document is built from paragraphs of the sample corpus
   (data/sample: SpamAssassin mails, HarmBench and StrongREJECT prompts) drawn by a seeded
   generator, ~680 tokens on average (FineWeb's mean), with a unique id and URL. A document
   with a HarmBench or StrongREJECT paragraph gets a URL under `/flagged/`, which the config
   routes `tag`.
2. Phase A, 2 ranks at once (one unit at a time each, so one core each): ingest, route, tag.
3. Phase B, 2 ranks at once: tokenize (SmolLM2) and pack (seq_len 2048), every rank packing
   its part.
4. Phase C, one process: score (the demo classifier, int8) and the LLM stages (annotate,
   synthesize with the in-process SmolLM2-135M) on a seeded sample of the documents
   (--sample-rows rows of one row group), to time them per document.
5. Phases A and B again on --s3-row-groups row groups with the input and the run directory on a
   local moto S3 server: the HTTP requests each rank sent, per unit.

Per stage it reports the core-seconds (the sum of unit seconds from the `stats` table: each
unit runs on one core), the input bytes and rows, throughput per core, bytes written (the
stage's folder on disk), and each phase's wall time and peak memory per rank (GNU time).
Writes everything as JSON (--json) for docs/scale.md.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import subprocess
import sys
import time
from pathlib import Path

from bench_common import fineweb_schema

REPO = Path(__file__).resolve().parent.parent
SAMPLE = REPO / "data" / "sample"
GGUF = REPO / "models" / "smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
CLASSIFIER = REPO / "classifiers" / "minilm-l6-safety" / "classifier.toml"
CHARS_PER_TOKEN = 3.36  # this corpus under the SmolLM2 tokenizer (measured: 8.68 MB -> 2.58M tokens)


def paragraphs() -> tuple[list[str], list[str]]:
    """(safe paragraphs, flagged paragraphs) of the sample corpus."""
    import gzip

    import pyarrow.parquet as pq
    import zstandard

    safe: list[str] = []
    for line in (SAMPLE / "spamassassin-ham.jsonl").open(encoding="utf-8"):
        safe.extend(p.strip() for p in json.loads(line)["text"].split("\n\n") if len(p.strip()) > 40)
    with gzip.open(SAMPLE / "spamassassin-spam.jsonl.gz", "rt", encoding="utf-8") as f:
        for line in f:
            safe.extend(p.strip() for p in json.loads(line)["text"].split("\n\n") if len(p.strip()) > 40)
    flagged = [t for t in pq.read_table(SAMPLE / "harmbench.parquet").column("text").to_pylist() if t]
    with (SAMPLE / "strongreject.jsonl.zst").open("rb") as f:
        text = zstandard.ZstdDecompressor().stream_reader(f).read().decode("utf-8")
    flagged.extend(json.loads(line)["text"] for line in text.splitlines() if line.strip())
    return safe, flagged


def write_corpus(out: Path, tokens: int, file_text_mb: int, rows_per_group: int, seed: int) -> dict:
    import pyarrow as pa
    import pyarrow.parquet as pq

    safe, flagged = paragraphs()
    rng = random.Random(seed)
    target_chars = int(tokens * CHARS_PER_TOKEN)
    file_chars = file_text_mb * 1_000_000
    schema = fineweb_schema()
    out.mkdir(parents=True, exist_ok=True)
    written, docs, files, n_flagged = 0, 0, [], 0
    while written < target_chars:
        path = out / f"{len(files):03d}_00000.parquet"
        writer = pq.ParquetWriter(path, schema, compression="zstd")
        in_file = 0
        while in_file < file_chars and written < target_chars:
            cols: dict[str, list] = {name: [] for name in schema.names}
            for _ in range(rows_per_group):
                want = int(rng.lognormvariate(7.6, 0.9))  # chars; mean ~2,700
                parts, size, bad = [], 0, False
                while size < want:
                    if rng.random() < 0.004:
                        parts.append(rng.choice(flagged))
                        bad = True
                    else:
                        parts.append(rng.choice(safe))
                    size += len(parts[-1]) + 2
                text = "\n\n".join(parts)
                n_flagged += bad
                cols["text"].append(text)
                cols["id"].append(f"<urn:uuid:scale-{seed}-{docs:09d}>")
                cols["dump"].append("CC-MAIN-2024-10")
                cols["url"].append(f"https://site{rng.randrange(100000)}.example/{'flagged/' if bad else ''}{docs}")
                cols["date"].append("2024-02-21T00:00:00Z")
                cols["file_path"].append(f"s3://commoncrawl/crawl-data/CC-MAIN-2024-10/segments/{docs % 977}.warc.gz")
                cols["language"].append("en")
                cols["language_score"].append(round(0.8 + rng.random() * 0.2, 4))
                cols["token_count"].append(int(len(text) / CHARS_PER_TOKEN))
                docs += 1
                in_file += len(text)
                written += len(text)
            writer.write_table(pa.table(cols, schema=schema), row_group_size=rows_per_group)
        writer.close()
        files.append(path)
    return {
        "files": [str(p) for p in files],
        "file_bytes": [p.stat().st_size for p in files],
        "documents": docs,
        "flagged_documents": n_flagged,
        "text_bytes": written,
        "rows_per_group": rows_per_group,
    }


CONFIG = """\
run_dir = "{run_dir}"

[[inputs]]
name = "web"
paths = [{paths}]

[ingest]
max_text_bytes = 4194304

[route]
default = "keep"

[[route.rules]]
name = "too_short"
when = "length(trim(text)) < 50"
route = "drop"

[[route.rules]]
name = "flagged"
when = "metadata.url LIKE '%/flagged/%'"
route = "tag"

[runner]
jobs = 1
{extra}"""

TOKENS = """
[tokenize]
tokenizer = "{gguf}"

[pack]
seq_len = 2048
shard_sequences = 8192
"""

SAMPLE_STAGES = """
[score]
model = "{classifier}"
precision = "int8"

[llm]
backend = "in-process"
model = "{gguf}"
max_batch = 16

[annotate]
sample = {annotate}
max_input_chars = 600
max_tokens = 16

[synthesize]
sample = {synthesize}
max_input_chars = 600

[synthesize.rephrase]
max_tokens = 96

[synthesize.refuse]
max_tokens = 96

[synthesize.moral]
max_tokens = 96
"""


def timed_ranks(bin_: str, config: Path, world: int, log_dir: Path, label: str) -> dict:
    """Runs `run` on every rank at once; wall seconds and each rank's peak memory."""
    start = time.perf_counter()
    procs = []
    for rank in range(world):
        log = open(log_dir / f"{label}-rank{rank}.log", "w")
        cmd = ["/usr/bin/time", "-f", "TIME %e %M", bin_, "run", str(config)]
        if world > 1:
            cmd += ["--rank", str(rank), "--world-size", str(world)]
        procs.append((subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT), log))
    peaks = []
    for proc, log in procs:
        proc.wait()
        log.close()
        text = Path(log.name).read_text()
        if proc.returncode != 0:
            sys.exit(f"{label} failed:\n{text[-3000:]}")
        peaks.append(int(re.findall(r"^TIME [0-9.]+ ([0-9]+)$", text, re.M)[-1]) // 1024)
    return {"wall_s": round(time.perf_counter() - start, 1), "peak_mib_per_rank": peaks}


def sql(bin_: str, config: Path, query: str) -> list[dict]:
    out = subprocess.run([bin_, "sql", str(config), query, "--format", "json"], capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"sql failed: {query}\n{out.stderr[-2000:]}")
    return json.loads(out.stdout or "[]")


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def s3_slice(bin_: str, work: Path, source: str, row_groups: int, logs: Path) -> dict:
    """Phases A and B again over `row_groups` row groups of one corpus file, with the input and
    the run directory on a local moto S3 server: the object-store requests per unit (each
    rank's `storage:` line counts the HTTP requests it sent)."""
    import pyarrow.parquet as pq

    from bench_common import local_s3

    sliced = work / "s3_slice.parquet"
    f = pq.ParquetFile(source)
    with pq.ParquetWriter(sliced, f.schema_arrow, compression="zstd") as w:
        for g in range(row_groups):
            w.write_table(f.read_row_group(g))
    with local_s3("scale") as (env, s3):
        s3.upload_file(str(sliced), "scale", "input/slice.parquet")
        run_dir = "s3://scale/run"
        paths = json.dumps("s3://scale/input/slice.parquet")
        a = work / "s3_a.toml"
        a.write_text(CONFIG.format(run_dir=run_dir, paths=paths, extra=""))
        b = work / "s3_b.toml"
        b.write_text(CONFIG.format(run_dir=run_dir, paths=paths, extra=TOKENS.format(gguf=GGUF)))
        out: dict = {"units": row_groups}
        subprocess.run([bin_, "plan", str(a)], check=True, capture_output=True, env=env)
        for label, config in [("phase_a", a), ("phase_b", b)]:
            procs = [
                subprocess.Popen(
                    [bin_, "run", str(config), "--rank", str(r), "--world-size", "2"],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.PIPE,
                    text=True,
                    env=env,
                )
                for r in range(2)
            ]
            lines = []
            for p in procs:
                _, err = p.communicate()
                if p.returncode != 0:
                    sys.exit(f"S3 slice {label} failed:\n{err[-3000:]}")
                (logs / f"s3_{label}.log").open("a").write(err)
                lines += [l for l in err.splitlines() if "sent to object stores" in l]
            out[label] = lines
        return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin", required=True)
    ap.add_argument("--dir", required=True)
    ap.add_argument("--tokens", type=int, default=600_000_000)
    ap.add_argument("--file-text-mb", type=int, default=1200)
    ap.add_argument("--rows-per-group", type=int, default=20_000)
    ap.add_argument("--sample-rows", type=int, default=400)
    ap.add_argument("--seed", type=int, default=13)
    ap.add_argument("--s3-row-groups", type=int, default=4, help="row groups in the S3 slice (0: skip it)")
    ap.add_argument("--s3-only", action="store_true", help="only the S3 slice, over the corpus already in DIR")
    ap.add_argument("--json")
    args = ap.parse_args()
    bin_ = str(Path(args.bin).resolve())
    work = Path(args.dir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    report: dict = {"tokens_target": args.tokens, "cpus": os.cpu_count()}
    if args.s3_only:
        logs = work / "logs"
        logs.mkdir(exist_ok=True)
        first_file = str(sorted((work / "corpus").glob("*.parquet"))[0])
        report = {"s3_slice": s3_slice(bin_, work, first_file, args.s3_row_groups, logs)}
        print(json.dumps(report, indent=1))
        if args.json:
            Path(args.json).write_text(json.dumps(report, indent=1))
        return

    t = time.perf_counter()
    corpus = write_corpus(work / "corpus", args.tokens, args.file_text_mb, args.rows_per_group, args.seed)
    corpus["write_s"] = round(time.perf_counter() - t, 1)
    report["corpus"] = corpus
    print(json.dumps(corpus), flush=True)

    paths = ", ".join(json.dumps(p) for p in corpus["files"])
    run_dir = work / "run"
    logs = work / "logs"
    logs.mkdir(exist_ok=True)
    phase_a = work / "phase_a.toml"
    phase_a.write_text(CONFIG.format(run_dir=run_dir, paths=paths, extra=""))
    full = work / "full.toml"
    full.write_text(CONFIG.format(run_dir=run_dir, paths=paths, extra=TOKENS.format(gguf=GGUF)))
    subprocess.run([bin_, "plan", str(phase_a)], check=True, capture_output=True)
    report["phase_a"] = timed_ranks(bin_, phase_a, 2, logs, "phase_a")
    print("phase A", report["phase_a"], flush=True)
    report["phase_b"] = timed_ranks(bin_, full, 2, logs, "phase_b")
    print("phase B", report["phase_b"], flush=True)

    stages = sql(
        bin_,
        full,
        "SELECT stage, count(*) AS units, sum(rows_in) AS rows_in, sum(rows_out) AS rows_out, "
        "sum(seconds) AS core_seconds FROM stats GROUP BY stage ORDER BY stage",
    )
    for s in stages:
        s["bytes_written"] = folder_bytes(run_dir / s["stage"])
    report["stages"] = stages
    report["pack_bytes_written"] = folder_bytes(run_dir / "pack")
    report["tokens"] = sql(bin_, full, "SELECT sum(n_tokens) AS tokens, count(*) AS docs FROM tokens")[0]
    report["shard_tokens"] = sql(bin_, full, "SELECT count(*) * 2049 AS tokens FROM shards")[0]["tokens"]
    report["tagged"] = sql(bin_, full, "SELECT sum(tags_inserted) AS tags, count(*) AS docs FROM tagged")[0]
    for line in (logs / "phase_b-rank0.log").read_text().splitlines():
        if line.startswith("pack: "):
            report["pack_summary_rank0"] = line

    # Phase C: the model stages on a seeded sample (one row group's first rows), one process.
    import pyarrow.parquet as pq

    sample = work / "sample.parquet"
    first = pq.ParquetFile(corpus["files"][0]).read_row_group(0).slice(0, args.sample_rows)
    pq.write_table(first, sample, compression="zstd")
    phase_c = work / "phase_c.toml"
    phase_c.write_text(
        CONFIG.format(run_dir=work / "run_sample", paths=json.dumps(str(sample)), extra="")
        .replace("route = \"tag\"", "route = \"rephrase\"")
        + SAMPLE_STAGES.format(classifier=CLASSIFIER, gguf=GGUF, annotate=0.02, synthesize=1.0)
    )
    report["phase_c"] = timed_ranks(bin_, phase_c, 1, logs, "phase_c")
    report["sample_stages"] = sql(
        bin_,
        phase_c,
        "SELECT stage, count(*) AS units, sum(rows_in) AS rows_in, sum(rows_out) AS rows_out, "
        "sum(seconds) AS core_seconds, max(figures) AS figures FROM stats GROUP BY stage ORDER BY stage",
    )
    report["sample_text_bytes"] = sum(len(t) for t in first.column("text").to_pylist())
    if args.s3_row_groups:
        report["s3_slice"] = s3_slice(bin_, work, corpus["files"][0], args.s3_row_groups, logs)
    print(json.dumps(report, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
