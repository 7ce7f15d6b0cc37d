#!/usr/bin/env python3
"""Ingest benchmark: safepipe vs datatrove vs plain Python, on one JSON Lines corpus.

Used by `make bench`:

    .venv/bin/python scripts/bench_ingest.py --bin target/debug/safepipe --out docs/BENCHMARKS.md

All three tools read the same `corpus.jsonl` (the bundled sample
data/sample/spamassassin-ham.jsonl repeated K times, ids made unique with `#k`) and write
zstd Parquet:

1. safepipe: `BIN run CONFIG` (plan + ingest to `documents` + the route stage), jobs = 2.
2. datatrove: JsonlReader -> ParquetWriter(compression="zstd") on a LocalPipelineExecutor,
   tasks=1 workers=1 (datatrove shards its input by file, so one file cannot use a second task).
3. plain Python: json.loads per line + pyarrow.parquet.ParquetWriter (zstd), batches of 4096 rows.

Every measurement is one child process, timed end to end (wall clock, process start and imports
included). Peak RSS comes from GNU time (`/usr/bin/time -f %M`) when present, else from polling
/proc/PID/status VmHWM; not from this script's own wait4(), whose ru_maxrss would include this
Python parent's memory (see timed()). Repetitions are interleaved
(safepipe, datatrove, plain, then again) so slow drift in machine load hits all tools alike; the
corpus is read once beforehand, so every run reads it from the page cache.

The section between `<!-- bench:ingest:start -->` and `<!-- bench:ingest:end -->` of --out is
replaced (or appended) with the results table; the table is printed to stdout too. `--quick`
(2 copies, 1 repetition) is a smoke test and writes --out only with `--write`.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import glob
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_common import fineweb_schema

REPO = Path(__file__).resolve().parent.parent
SAMPLE = REPO / "data" / "sample" / "spamassassin-ham.jsonl"
START = "<!-- bench:ingest:start -->"
END = "<!-- bench:ingest:end -->"
TARGET_BYTES = 100_000_000
PLAIN_BATCH_ROWS = 4096
ZSTD_LEVEL = 3  # what safepipe writes (pipeline/src/writer.rs)
RSS_TOOL: str | None = None  # GNU time, when present (see timed())
WARNINGS: list[str] = []  # output row-count mismatches, shown in the report

SAFEPIPE_CONFIG = """\
run_dir = "run"

[[inputs]]
name = "bench"
paths = ["corpus.jsonl"]

[plan]
jsonl_unit_bytes = 16777216

[runner]
jobs = 2
"""

# Variables from which safepipe would take a rank / world size other than 0 of 1 (docs/cli.md).
RANK_ENV = (
    "SLURM_ARRAY_TASK_ID",
    "SLURM_ARRAY_TASK_MIN",
    "SLURM_ARRAY_TASK_COUNT",
    "SLURM_PROCID",
    "SLURM_NTASKS",
    "JOB_COMPLETION_INDEX",
    "SAFEPIPE_WORLD_SIZE",
)


# --------------------------------------------------------------------------------------------
# Children: the two Python baselines run as `bench_ingest.py --child NAME ...` so that each has
# its own process, timed and measured exactly like safepipe.
# --------------------------------------------------------------------------------------------


def child_plain(corpus: str, out_dir: str) -> dict:
    import pyarrow as pa
    import pyarrow.parquet as pq

    t0 = time.perf_counter()
    schema = fineweb_schema()
    names = schema.names
    rows = 0
    os.makedirs(out_dir, exist_ok=True)
    with pq.ParquetWriter(
        os.path.join(out_dir, "documents.parquet"),
        schema,
        compression="zstd",
        compression_level=ZSTD_LEVEL,
    ) as writer:
        cols: dict[str, list] = {n: [] for n in names}
        n_batch = 0

        def flush() -> None:
            nonlocal cols, n_batch
            if n_batch:
                writer.write_batch(pa.RecordBatch.from_pydict(cols, schema=schema))
            cols = {n: [] for n in names}
            n_batch = 0

        with open(corpus, "rb") as f:
            for line in f:
                if not line.strip():
                    continue
                rec = json.loads(line)
                for n in names:
                    cols[n].append(rec.get(n))
                n_batch += 1
                rows += 1
                if n_batch == PLAIN_BATCH_ROWS:
                    flush()
        flush()
    return {"docs": rows, "work_s": time.perf_counter() - t0}


def child_datatrove(corpus: str, out_dir: str, logs: str, tasks: int) -> dict:
    t_import = time.perf_counter()
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.writers import ParquetWriter

    t0 = time.perf_counter()
    folder, name = os.path.split(corpus)
    pipeline = [
        JsonlReader(folder, glob_pattern=name, recursive=False, add_file_path=False),
        ParquetWriter(
            out_dir,
            compression="zstd",
            # Content-defined chunking is a Hub-dedup feature the other two don't do; off for
            # a like-for-like comparison. datatrove has no compression-level knob (pyarrow's
            # default zstd level applies).
            use_content_defined_chunking=False,
        ),
    ]
    executor = LocalPipelineExecutor(
        pipeline=pipeline, tasks=tasks, workers=tasks, logging_dir=logs, skip_completed=False
    )
    executor.run()
    return {"work_s": time.perf_counter() - t0, "import_s": t0 - t_import}


def child_datatrove_info(corpus: str) -> dict:
    import datatrove
    from datatrove.io import get_datafolder

    try:
        from importlib.metadata import version

        ver = version("datatrove")
    except Exception:  # pragma: no cover
        ver = getattr(datatrove, "__version__", "unknown")
    folder, name = os.path.split(corpus)
    df = get_datafolder(folder)
    shards = [len(df.get_shard(r, 2, recursive=False, glob_pattern=name)) for r in range(2)]
    return {"version": ver, "files_per_rank_of_2": shards}


def run_child(argv: list[str]) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--child", required=True)
    p.add_argument("--corpus", required=True)
    p.add_argument("--out-dir")
    p.add_argument("--logs")
    p.add_argument("--tasks", type=int, default=1)
    a = p.parse_args(argv)
    if a.child == "plain":
        res = child_plain(a.corpus, a.out_dir)
    elif a.child == "datatrove":
        res = child_datatrove(a.corpus, a.out_dir, a.logs, a.tasks)
    elif a.child == "datatrove-info":
        res = child_datatrove_info(a.corpus)
    else:
        raise SystemExit(f"unknown child {a.child}")
    # Last stdout line is the result; datatrove logs to stderr.
    print("BENCH_RESULT " + json.dumps(res), flush=True)


# --------------------------------------------------------------------------------------------
# Parent
# --------------------------------------------------------------------------------------------


def build_corpus(dst: Path, copies: int) -> tuple[int, int]:
    """Writes `copies` copies of the sample, ids suffixed `#k`; returns (docs, bytes)."""
    records = []
    with open(SAMPLE, "rb") as f:
        for line in f:
            if line.strip():
                records.append(json.loads(line))
    docs = 0
    with open(dst, "w", encoding="utf-8", newline="\n") as out:
        for k in range(copies):
            for rec in records:
                r = dict(rec)
                r["id"] = f"{rec['id']}#{k}"
                out.write(json.dumps(r, ensure_ascii=False))
                out.write("\n")
                docs += 1
    return docs, dst.stat().st_size


def gnu_time() -> str | None:
    """/usr/bin/time if it is GNU time (understands -f/-o), else None."""
    t = "/usr/bin/time"
    if not os.access(t, os.X_OK):
        return None
    try:
        ok = subprocess.run([t, "-f", "%M", "-o", os.devnull, "true"], capture_output=True).returncode == 0
    except OSError:
        ok = False
    return t if ok else None


def poll_hwm(pid: int, stop, box: list) -> None:
    """Keeps box[0] = the largest VmHWM (KiB) seen in /proc/PID/status until stop is set."""
    path = f"/proc/{pid}/status"
    while not stop.is_set():
        try:
            with open(path) as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        box[0] = max(box[0], int(line.split()[1]))
                        break
        except (OSError, ValueError):
            pass
        stop.wait(0.01)


def timed(cmd: list[str], cwd: Path, log: Path, env: dict | None = None) -> dict:
    """Runs cmd; returns wall seconds, peak RSS (bytes) and the child's BENCH_RESULT line.

    Peak RSS is not taken from this process's wait4(): on Linux a child's ru_maxrss also counts the
    memory of the process it was forked from (the mm that exec replaces), i.e. this Python parent.
    With GNU time, cmd runs as its grandchild, forked from a ~2 MiB process, and time reports
    that grandchild's ru_maxrss (%M). Without it, /proc/PID/status VmHWM (the high-water mark
    of the exec'd image alone) is polled every 10 ms; the last 10 ms before exit can be missed.
    """
    import threading

    rss_file = Path(str(log) + ".rss")
    if RSS_TOOL:
        cmd = [RSS_TOOL, "-f", "%M", "-o", str(rss_file)] + cmd
    with open(log, "wb") as err, open(str(log) + ".out", "wb") as out:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=cwd, stdout=out, stderr=err, env=env)
        box, stop, poller = [0], threading.Event(), None
        if not RSS_TOOL:
            poller = threading.Thread(target=poll_hwm, args=(proc.pid, stop, box), daemon=True)
            poller.start()
        code = proc.wait()
        wall = time.perf_counter() - t0
        if poller:
            stop.set()
            poller.join()
    stdout = Path(str(log) + ".out").read_text(errors="replace")
    if code != 0:
        tail = log.read_text(errors="replace")[-4000:]
        raise SystemExit(
            f"command failed (exit {code}): {shlex.join(cmd)}\n--- stdout ---\n{stdout[-2000:]}\n--- stderr ---\n{tail}"
        )
    if RSS_TOOL:
        box[0] = int(rss_file.read_text().split()[-1])
    result = {}
    for line in stdout.splitlines():
        if line.startswith("BENCH_RESULT "):
            result = json.loads(line[len("BENCH_RESULT ") :])
    return {"wall": wall, "rss": box[0] * 1024, "result": result}


def output_of(tool: str, pattern: str, docs: int) -> int:
    """Bytes of the Parquet files matching pattern; warns unless they hold exactly `docs` rows."""
    import pyarrow.parquet as pq

    files = [p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p)]
    rows = sum(pq.read_metadata(p).num_rows for p in files)
    if rows != docs:
        msg = f"{tool} wrote {rows} rows in {len(files)} file(s), expected {docs}"
        print(f"warning: {msg}", file=sys.stderr)
        if msg not in WARNINGS:
            WARNINGS.append(msg)
    return sum(os.path.getsize(p) for p in files)


def machine() -> dict:
    model = "unknown"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        mem = next(l for l in open("/proc/meminfo") if l.startswith("MemTotal")).split()[1]
        mem_gib = int(mem) / 2**20
    except (OSError, StopIteration):
        mem_gib = float("nan")
    return {
        "nproc": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "cpu": model,
        "mem_gib": mem_gib,
        "load": os.getloadavg(),
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
    }


def git_rev() -> str:
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=REPO, capture_output=True, text=True).stdout
        return rev + ("+dirty" if dirty.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def display_path(p: str) -> str:
    """A path as the user would type it from the repo root; never an absolute path of this machine."""
    try:
        return os.path.relpath(Path(p).resolve(), REPO) if Path(p).resolve().is_relative_to(REPO) else Path(p).name
    except (OSError, ValueError):
        return Path(p).name


def the_command(args: argparse.Namespace) -> str:
    py = ".venv/bin/python" if Path(sys.executable).absolute().is_relative_to(REPO) else "python3"
    parts = [py, "scripts/bench_ingest.py", "--bin", display_path(args.bin), "--out", display_path(args.out)]
    if args.scale is not None:
        parts += ["--scale", str(args.scale)]
    if args.reps is not None:
        parts += ["--reps", str(args.reps)]
    if args.quick:
        parts.append("--quick")
    return shlex.join(parts)


def fmt_mib(b: float) -> str:
    return f"{b / 2**20:,.0f}"


def render(info: dict, rows: list[dict]) -> str:
    m = info["machine"]
    sp = rows[0]
    lines = [
        "## Ingest: JSON Lines to zstd Parquet",
        "",
        f"Measured {info['date']} on {m['nproc']} CPUs ({m['cpu']}), {m['mem_gib']:.0f} GiB RAM, {m['os']}, "
        f"load average {m['load'][0]:.2f} at the start; safepipe {info['git']} (`{info['bin']}`, "
        f"{info['profile']}), datatrove {info['datatrove']}, pyarrow {info['pyarrow']}, Python {m['python']}.",
        "",
        f"Input: one `corpus.jsonl` of {info['mb']:.1f} MB ({info['docs']:,} documents): "
        f"`data/sample/spamassassin-ham.jsonl` repeated {info['copies']} times, ids suffixed `#k`. "
        f"Median of {info['reps']} run(s) each, interleaved, page cache warm.",
        "",
        "| tool | setup | wall s (median) | MB/s | docs/s | peak RSS MiB | output MiB | safepipe speedup |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        speed = "—" if r is sp else f"{r['wall'] / sp['wall']:.2f}x"
        lines.append(
            f"| {r['tool']} | {r['setup']} | {r['wall']:.2f} | {info['mb'] / r['wall']:,.1f} | "
            f"{info['docs'] / r['wall']:,.0f} | {fmt_mib(r['rss'])} | {r['out_mib']:.1f} | {speed} |"
        )
    lines.append("")
    for r in rows[1:]:
        ratio = r["wall"] / sp["wall"]
        word = "faster than" if ratio >= 1 else "slower than"
        shown = ratio if ratio >= 1 else 1 / ratio
        lines.append(f"- safepipe is {shown:.2f}x {word} {r['tool']} ({r['setup'].split(';')[0]}).")
    lines += [
        "",
        "Notes:",
        "- Wall time is the whole command, process start and imports included; MB = 10^6 bytes of input. "
        f"Peak RSS: {info['rss_method']}; the largest of the repetitions.",
        "- safepipe's time covers `safepipe run` end to end: the work plan, ingest to `documents` and the "
        "route stage (default route `keep`), with `jsonl_unit_bytes = 16777216` and `jobs = 2`. "
        "Output MiB is its `documents` table only (zstd level 3). Every tool's output is checked to hold "
        "exactly the input's documents (Parquet footers' row counts).",
        f"- datatrove: `JsonlReader` -> `ParquetWriter(compression=\"zstd\", use_content_defined_chunking=False)` "
        f"(pyarrow's default zstd level; content-defined chunking off, since the others don't do it), "
        f"writer batches of 1000 (its default), `LocalPipelineExecutor(tasks=1, workers=1)`. {info['datatrove_tasks_note']} "
        f"Of its wall time, {info['datatrove_import_s']:.2f} s (median) is importing datatrove.",
        f"- plain Python: `json.loads` per line, `pyarrow.parquet.ParquetWriter` (zstd level {ZSTD_LEVEL}, "
        f"explicit schema of the 9 input fields) in batches of {PLAIN_BATCH_ROWS} rows, one process.",
    ]
    for w in WARNINGS:
        lines += [f"- **Warning: {w}.**"]
    if info.get("quick"):
        lines += ["- **--quick smoke run: too small and too few repetitions to mean anything.**"]
    lines += [
        "",
        "Command (what `make bench` runs):",
        "",
        "```",
        info["command"],
        "```",
    ]
    return "\n".join(lines) + "\n"


def write_section(out: Path, body: str, start: str = START, end: str = END) -> None:
    """Replaces the text between the markers `start` and `end` of `out` (or appends it)."""
    START, END = start, end  # noqa: N806 (the markers of this section)
    section = f"{START}\n{body}{END}\n"
    if out.exists():
        text = out.read_text()
        if START in text and END in text and text.index(START) < text.index(END):
            head, rest = text.split(START, 1)
            _, tail = rest.split(END, 1)
            text = head + section.rstrip("\n") + tail
            if not text.endswith("\n"):
                text += "\n"
        else:
            text = text.rstrip("\n") + "\n\n" + section
    else:
        text = (
            "# Benchmarks\n\n"
            "How to reproduce: `make bench` (builds `target/debug/safepipe`, installs "
            "`requirements-bench.txt` into `.venv`, then runs `scripts/bench_ingest.py`, which rewrites "
            "the sections below). Numbers depend on the machine and its load; each section says what it "
            "ran on.\n\n" + section
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)


def main() -> None:
    if "--child" in sys.argv[1:]:
        run_child(sys.argv[1:])
        return

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bin", required=True, help="the safepipe binary")
    ap.add_argument("--out", required=True, help="markdown file whose bench:ingest section is rewritten")
    ap.add_argument("--scale", type=int, help="copies of the sample in the corpus (default: ~100 MB)")
    ap.add_argument("--reps", type=int, help="repetitions per tool (default 3; 1 with --quick)")
    ap.add_argument("--quick", action="store_true", help="smoke test: 2 copies, 1 repetition, --out untouched")
    ap.add_argument("--write", action="store_true", help="with --quick, write --out anyway")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = ap.parse_args()

    binary = Path(args.bin).resolve()
    if not (binary.is_file() and os.access(binary, os.X_OK)):
        raise SystemExit(f"no safepipe binary at {args.bin}; run `make build` first")
    if not SAMPLE.is_file():
        raise SystemExit("no sample corpus at data/sample/spamassassin-ham.jsonl; run `make setup` first")

    global RSS_TOOL
    RSS_TOOL = gnu_time()
    sample_bytes = SAMPLE.stat().st_size
    copies = args.scale or (2 if args.quick else max(1, -(-TARGET_BYTES // sample_bytes)))
    reps = args.reps or (1 if args.quick else 3)

    tmp = Path(tempfile.mkdtemp(prefix="safepipe-bench-"))
    try:
        corpus = tmp / "corpus.jsonl"
        docs, nbytes = build_corpus(corpus, copies)
        with open(corpus, "rb") as f:  # warm the page cache
            while f.read(1 << 24):
                pass
        (tmp / "bench.toml").write_text(SAFEPIPE_CONFIG)
        me = [sys.executable, str(Path(__file__).resolve())]
        print(f"corpus: {nbytes / 1e6:.1f} MB, {docs:,} docs ({copies} copies); {reps} repetition(s)", file=sys.stderr)

        dt_info = timed(me + ["--child", "datatrove-info", "--corpus", str(corpus)], tmp, tmp / "dtinfo.log")["result"]
        splits = sum(1 for n in dt_info["files_per_rank_of_2"] if n > 0) > 1
        dt_tasks = [1, 2] if splits else [1]
        if splits:
            tasks_note = "It can split one file across tasks, so tasks=2 workers=2 is measured too."
        else:
            tasks_note = (
                "tasks=2 is not measured: datatrove shards its input by file, and with one input file "
                f"the second task gets nothing (files per rank of 2: {dt_info['files_per_rank_of_2']})."
            )

        env_sp = {k: v for k, v in os.environ.items() if k not in RANK_ENV}
        samples: dict[str, list[dict]] = {}
        for rep in range(reps):
            # safepipe
            run_dir = tmp / "run"
            shutil.rmtree(run_dir, ignore_errors=True)
            r = timed([str(binary), "run", "bench.toml"], tmp, tmp / f"safepipe-{rep}.log", env_sp)
            r["out"] = output_of("safepipe", str(run_dir / "**" / "documents" / "*.parquet"), docs)
            samples.setdefault("safepipe", []).append(r)
            print(f"  rep {rep + 1}: safepipe {r['wall']:.2f} s", file=sys.stderr)

            # datatrove
            for t in dt_tasks:
                out_dir, logs = tmp / f"dt{t}-out", tmp / f"dt{t}-logs"
                shutil.rmtree(out_dir, ignore_errors=True)
                shutil.rmtree(logs, ignore_errors=True)
                r = timed(
                    me + ["--child", "datatrove", "--corpus", str(corpus), "--out-dir", str(out_dir),
                          "--logs", str(logs), "--tasks", str(t)],
                    tmp, tmp / f"datatrove{t}-{rep}.log", dict(os.environ, HF_HUB_OFFLINE="1"),
                )
                r["out"] = output_of(f"datatrove tasks={t}", str(out_dir / "**" / "*.parquet"), docs)
                samples.setdefault(f"datatrove{t}", []).append(r)
                print(f"  rep {rep + 1}: datatrove tasks={t} {r['wall']:.2f} s", file=sys.stderr)

            # plain Python
            out_dir = tmp / "plain-out"
            shutil.rmtree(out_dir, ignore_errors=True)
            r = timed(me + ["--child", "plain", "--corpus", str(corpus), "--out-dir", str(out_dir)],
                      tmp, tmp / f"plain-{rep}.log")
            r["out"] = output_of("plain Python", str(out_dir / "*.parquet"), docs)
            samples.setdefault("plain", []).append(r)
            print(f"  rep {rep + 1}: plain {r['wall']:.2f} s", file=sys.stderr)

        def summary(key: str, tool: str, setup: str) -> dict:
            s = samples[key]
            return {
                "tool": tool,
                "setup": setup,
                "wall": statistics.median(x["wall"] for x in s),
                "rss": max(x["rss"] for x in s),
                "out_mib": statistics.median(x["out"] for x in s) / 2**20,
            }

        rows = [summary("safepipe", "safepipe", "`run`; jobs=2, 16 MiB units")]
        for t in dt_tasks:
            rows.append(summary(f"datatrove{t}", "datatrove", f"tasks={t}; workers={t}"))
        rows.append(summary("plain", "plain Python", f"json + pyarrow; batch {PLAIN_BATCH_ROWS}"))

        import pyarrow

        info = {
            "machine": machine(),
            "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d"),
            "git": git_rev(),
            "bin": display_path(args.bin),
            "profile": "dev profile (dependencies at opt-level 1, ingest hot path at 2; see Cargo.toml)" if "debug" in binary.parts else "release profile",
            "datatrove": dt_info["version"],
            "pyarrow": pyarrow.__version__,
            "mb": nbytes / 1e6,
            "docs": docs,
            "copies": copies,
            "reps": reps,
            "datatrove_tasks_note": tasks_note,
            "datatrove_import_s": statistics.median(x["result"].get("import_s", 0.0) for x in samples["datatrove1"]),
            "command": the_command(args),
            "rss_method": (
                "`ru_maxrss` of the command as reported by GNU time (`/usr/bin/time -f %M`), i.e. the kernel's "
                "high-water mark of its resident set, threads included (no measured command forks)"
                if RSS_TOOL
                else "the command's `VmHWM` from `/proc/PID/status`, polled every 10 ms (GNU time absent)"
            ),
            "quick": args.quick,
        }
        body = render(info, rows)
        print(body)
        if args.quick and not args.write:
            print(f"(--quick: {args.out} left unchanged; add --write to write it)", file=sys.stderr)
        else:
            write_section(Path(args.out), body)
            print(f"wrote the bench:ingest section of {args.out}", file=sys.stderr)
    finally:
        if args.keep:
            print(f"kept {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
