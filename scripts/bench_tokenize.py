#!/usr/bin/env python3
"""Tokenize benchmark: safepipe's tag + tokenize + pack vs datatrove's DocumentTokenizer vs a raw
`tokenizers` batch encode, on one corpus and one tokenizer.

Used by `make bench`:

    .venv/bin/python scripts/bench_tokenize.py --bin target/debug/safepipe --out docs/BENCHMARKS.md

Corpus: the bundled SpamAssassin sample (ham + spam bodies) repeated to ~20 MB of JSON Lines,
ids made unique with `#k`. Tokenizer: the SmolLM2 tokenizer + the tag as exported by
`safepipe tokenizer export` (the same tokenizer.json for every tool).

1. safepipe, end to end: `run` of plan + ingest + route + tag + tokenize + pack (seq_len 2048).
   Then `run --force tag` redoes exactly tag + tokenize + pack on the committed documents: that
   wall time is the "tag+tokenize+pack" row (process start and config load included).
2. datatrove: JsonlReader -> DocumentTokenizer(tokenizer.json, eos <|endoftext|>, shuffle off)
   on a LocalPipelineExecutor(tasks=1, workers=1), writing its .ds/.index files to local disk.
3. raw encode: Python `tokenizers` on all texts already in memory: `encode_batch` (the
   baseline this project measured before it began) and `encode_batch_fast` (no offsets), 2
   threads; only the encode call is timed.

Peak RSS of the safepipe run is measured at 1x and 10x the input size (one run each). The
section between `<!-- bench:tokenize:start -->` and `<!-- bench:tokenize:end -->` of --out is
rewritten. `--quick` is a smoke test (2 MB, 1 repetition, no 10x) that writes only with --write.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gzip
import json
import os
import shlex
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_ingest as common  # noqa: E402  (timed, machine, git_rev, write_section)

REPO = common.REPO
START = "<!-- bench:tokenize:start -->"
END = "<!-- bench:tokenize:end -->"
SAMPLES = [REPO / "data/sample/spamassassin-ham.jsonl", REPO / "data/sample/spamassassin-spam.jsonl.gz"]
GGUF = REPO / "models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

CONFIG = """\
run_dir = "run"

[[inputs]]
name = "mail"
paths = ["corpus.jsonl"]

[plan]
jsonl_unit_bytes = 4194304

[runner]
jobs = 2

[[route.rules]]
name = "spam_tagged"
when = "metadata.extra LIKE '%spam%'"
route = "tag"

[tokenize]
tokenizer = "{gguf}"

[pack]
seq_len = 2048
spill_dir = "spill"
"""


def child_raw(corpus: str, tokenizer_json: str) -> dict:
    import time

    from tokenizers import Tokenizer

    texts = [json.loads(line)["text"] for line in open(corpus, encoding="utf-8") if line.strip()]
    tok = Tokenizer.from_file(tokenizer_json)
    out = {}
    for name in ("encode_batch", "encode_batch_fast"):
        fn = getattr(tok, name)
        t0 = time.perf_counter()
        encs = fn(texts, add_special_tokens=False)
        secs = time.perf_counter() - t0
        out[name] = {"seconds": secs, "tokens": sum(len(e.ids) for e in encs) + len(texts)}
    return out


def child_datatrove(corpus: str, tokenizer_json: str, out_dir: str, logs: str) -> dict:
    from datatrove.executor.local import LocalPipelineExecutor
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.tokens import DocumentTokenizer

    executor = LocalPipelineExecutor(
        pipeline=[
            JsonlReader(os.path.dirname(corpus), glob_pattern=os.path.basename(corpus)),
            DocumentTokenizer(
                output_folder=out_dir,
                tokenizer_name_or_path=tokenizer_json,
                eos_token="<|endoftext|>",
                shuffle_documents=False,
            ),
        ],
        tasks=1,
        workers=1,
        logging_dir=logs,
    )
    executor.run()
    tokens = 0
    for root, _, files in os.walk(out_dir):
        for f in files:
            if f.endswith(".ds"):
                tokens += os.path.getsize(os.path.join(root, f)) // 2
    return {"tokens": tokens}


def run_child(argv: list[str]) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--child", required=True)
    p.add_argument("--corpus", required=True)
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--out-dir")
    p.add_argument("--logs")
    a = p.parse_args(argv)
    if a.child == "raw":
        res = child_raw(a.corpus, a.tokenizer)
    elif a.child == "datatrove":
        res = child_datatrove(a.corpus, a.tokenizer, a.out_dir, a.logs)
    else:
        raise SystemExit(f"unknown child {a.child}")
    print("BENCH_RESULT " + json.dumps(res), flush=True)


def build_corpus(dst: Path, target_bytes: int) -> tuple[int, int]:
    """Ham + spam records (spam marked in a field `label`), repeated until target_bytes."""
    records = []
    for path in SAMPLES:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rt", encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    rec = json.loads(line)
                    records.append({"id": rec["id"], "text": rec["text"],
                                    "label": "spam" if "spam" in path.name else "ham"})
    docs, size, k = 0, 0, 0
    with open(dst, "w", encoding="utf-8", newline="\n") as out:
        while size < target_bytes:
            for rec in records:
                line = json.dumps({**rec, "id": f"{rec['id']}#{k}"}, ensure_ascii=False) + "\n"
                out.write(line)
                size += len(line.encode())
                docs += 1
                if size >= target_bytes:
                    break
            k += 1
    return docs, dst.stat().st_size


def safepipe_tokens(bin_: str, config: Path) -> int:
    import subprocess

    out = subprocess.run([bin_, "sql", str(config), "SELECT sum(n_tokens) AS n FROM tokens", "--format", "csv"],
                         capture_output=True, text=True, check=True).stdout
    return int(out.splitlines()[1])


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        run_child(sys.argv[1:])
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin", required=True, help="the safepipe binary")
    ap.add_argument("--out", required=True, help="markdown file whose bench:tokenize section is rewritten")
    ap.add_argument("--mb", type=float, default=20.0, help="corpus size in MB (default 20)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--write", action="store_true", help="with --quick: write --out anyway")
    args = ap.parse_args()
    if args.quick:
        args.mb, args.reps = 2.0, 1
    common.RSS_TOOL = common.gnu_time()
    bin_ = str(Path(args.bin).resolve())
    info = common.machine()
    work = Path(tempfile.mkdtemp(prefix="bench-tokenize-"))
    try:
        corpus = work / "corpus.jsonl"
        docs, size = build_corpus(corpus, int(args.mb * 1e6))
        config = work / "config.toml"
        config.write_text(CONFIG.format(gguf=GGUF))
        tokenizer_json = work / "tokenizer.json"
        common.timed([bin_, "tokenizer", "export", str(config), "--out", str(tokenizer_json)], work, work / "export.log")
        py = sys.executable
        me = str(Path(__file__).resolve())
        rows: dict[str, list[dict]] = {"e2e": [], "ttp": [], "datatrove": [], "raw": []}
        for rep in range(args.reps):
            shutil.rmtree(work / "run", ignore_errors=True)
            rows["e2e"].append(common.timed([bin_, "run", str(config)], work, work / f"e2e-{rep}.log"))
            rows["ttp"].append(common.timed([bin_, "run", str(config), "--force", "tag"], work, work / f"ttp-{rep}.log"))
            dt_out = work / f"dt-{rep}"
            rows["datatrove"].append(common.timed(
                [py, me, "--child", "datatrove", "--corpus", str(corpus), "--tokenizer", str(tokenizer_json),
                 "--out-dir", str(dt_out), "--logs", str(work / f"dt-logs-{rep}")], work, work / f"dt-{rep}.log"))
            shutil.rmtree(dt_out, ignore_errors=True)
            shutil.rmtree(work / f"dt-logs-{rep}", ignore_errors=True)
            rows["raw"].append(common.timed(
                [py, me, "--child", "raw", "--corpus", str(corpus), "--tokenizer", str(tokenizer_json)],
                work, work / f"raw-{rep}.log"))
        ours_tokens = safepipe_tokens(bin_, config)
        manifest = json.loads((work / "run/pack/manifest.json").read_text())
        dt_tokens = rows["datatrove"][0]["result"]["tokens"]
        big = None
        if not args.quick:
            big_dir = work / "x10"
            big_dir.mkdir()
            with open(big_dir / "corpus.jsonl", "w") as out:
                for _ in range(10):
                    out.write(corpus.read_text())
            (big_dir / "config.toml").write_text(CONFIG.format(gguf=GGUF))
            big = common.timed([bin_, "run", str(big_dir / "config.toml")], big_dir, big_dir / "run.log")
            big["tokens"] = safepipe_tokens(bin_, big_dir / "config.toml")
        body = render(info, args, docs, size, rows, ours_tokens, dt_tokens, manifest, big)
        print(body)
        if not args.quick or args.write:
            common.write_section(Path(args.out), body, START, END)
            print(f"wrote the bench:tokenize section of {args.out}", file=sys.stderr)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def render(info, args, docs, size, rows, ours_tokens, dt_tokens, manifest, big) -> str:
    med = lambda xs: statistics.median(xs)  # noqa: E731
    e2e = med([r["wall"] for r in rows["e2e"]])
    ttp = med([r["wall"] for r in rows["ttp"]])
    dt = med([r["wall"] for r in rows["datatrove"]])
    raw_b = med([r["result"]["encode_batch"]["seconds"] for r in rows["raw"]])
    raw_f = med([r["result"]["encode_batch_fast"]["seconds"] for r in rows["raw"]])
    raw_tokens = rows["raw"][0]["result"]["encode_batch"]["tokens"]
    rss1 = max(r["rss"] for r in rows["e2e"])
    tps = lambda tokens, secs: tokens / secs  # noqa: E731
    ours = tps(ours_tokens, ttp)
    lines = [
        "## Tokenize: tag + tokenize + pack vs datatrove and a raw encode",
        "",
        f"Measured {_dt.date.today()} on {info['nproc']} CPUs ({info['cpu']}), {info['mem_gib']:.0f} GiB RAM, "
        f"load average {info['load'][0]:.2f} at the start; safepipe {common.git_rev()} (`{common.display_path(args.bin)}`), "
        f"Python {info['python']}.",
        "",
        f"Input: {size / 1e6:.1f} MB of JSON Lines ({docs:,} SpamAssassin mails, ham and spam, repeated), "
        f"SmolLM2 tokenizer + tag (vocabulary 49153). Median of {args.reps} run(s), interleaved.",
        "",
        "| what | wall s | tokens | M tokens/s | peak RSS MiB | safepipe tag+tokenize+pack vs this |",
        "|---|---:|---:|---:|---:|---:|",
        f"| safepipe tag+tokenize+pack (`run --force tag`) | {ttp:.2f} | {ours_tokens:,} | {ours / 1e6:.2f} | "
        f"{common.fmt_mib(max(r['rss'] for r in rows['ttp']))} | — |",
        f"| safepipe end to end (ingest .. pack) | {e2e:.2f} | {ours_tokens:,} | {tps(ours_tokens, e2e) / 1e6:.2f} | "
        f"{common.fmt_mib(rss1)} | {ours / tps(ours_tokens, e2e):.2f}x |",
        f"| datatrove DocumentTokenizer, tasks=1 | {dt:.2f} | {dt_tokens:,} | {tps(dt_tokens, dt) / 1e6:.2f} | "
        f"{common.fmt_mib(max(r['rss'] for r in rows['datatrove']))} | {ours / tps(dt_tokens, dt):.2f}x |",
        f"| raw `encode_batch`, texts in memory | {raw_b:.2f} | {raw_tokens:,} | {tps(raw_tokens, raw_b) / 1e6:.2f} | "
        f"— | {ours / tps(raw_tokens, raw_b):.2f}x |",
        f"| raw `encode_batch_fast`, texts in memory | {raw_f:.2f} | {raw_tokens:,} | {tps(raw_tokens, raw_f) / 1e6:.2f} | "
        f"— | {ours / tps(raw_tokens, raw_f):.2f}x |",
        "",
    ]
    if big:
        lines.append(
            f"Memory at 10x input ({10 * size / 1e6:.0f} MB, {big['tokens']:,} tokens): peak RSS "
            f"{common.fmt_mib(big['rss'])} MiB end to end in {big['wall']:.1f} s, vs {common.fmt_mib(rss1)} MiB at 1x."
        )
        lines.append("")
    lines += [
        "Notes:",
        "- Tokens: safepipe counts `sum(n_tokens)` of `tokens` (EOS included); the raw encode counts ids + one "
        "EOS per text; datatrove counts its .ds files (uint16 ids, its EOS included). Spam mails are routed `tag` "
        f"(Algorithm 1, p = 0.05), so safepipe also inserts and encodes tags; the pack wrote "
        f"{manifest['sequences']:,} rows of 2049 tokens.",
        "- `run --force tag` reruns tag, tokenize and pack over the committed documents (ingest and route are "
        "skipped): the pipeline's part that corresponds to datatrove's tokenizer step, with its process start, "
        "tokenizer load from the GGUF and Parquet I/O included.",
        "",
        "Command (what `make bench` runs):",
        "",
        "```",
        shlex.join([".venv/bin/python", "scripts/bench_tokenize.py", "--bin", common.display_path(args.bin),
                    "--out", common.display_path(args.out)]),
        "```",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
