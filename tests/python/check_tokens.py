#!/usr/bin/env python3
"""Oracle for the tokenize stage: Python's `tokenizers` on our exported tokenizer.json must give
exactly the ids in the run's `tokens` table. Texts are encoded as text (`encode_special_tokens`:
a special token's string in a document is its characters), tagged texts piece by piece between
the inserted tags of `tagged.tag_offsets`, each of which is the tag id.

usage: check_tokens.py RUN_DIR TOKENIZER_JSON TAG
Reads the committed Parquet files of `documents`, `tagged` and `tokens` (a fresh run directory:
every file there is committed), re-encodes every text and compares. Prints one JSON summary.
"""
import glob
import json
import os
import sys

import pyarrow.parquet as pq
from tokenizers import Tokenizer


def table(run_dir, stage, name):
    rows = []
    for path in sorted(glob.glob(os.path.join(run_dir, stage, name, "*.parquet"))):
        rows.extend(pq.read_table(path).to_pylist())
    return rows


def main():
    run_dir, tokenizer_json, tag = sys.argv[1:4]
    tok = Tokenizer.from_file(tokenizer_json)
    as_text = Tokenizer.from_file(tokenizer_json)
    as_text.encode_special_tokens = True
    eos = tok.token_to_id("<|endoftext|>")
    tag_id = tok.token_to_id(tag)
    assert tag_id is not None, "the tag is not in the exported vocabulary"
    assert tok.encode(tag, add_special_tokens=False).ids == [tag_id], "the tag is not one token"
    texts = {("raw", r["id"]): (r["text"], []) for r in table(run_dir, "ingest", "documents")}
    tagged = {r["id"]: r for r in table(run_dir, "tag", "tagged")}
    texts.update({("tagged", i): (r["text"], r["tag_offsets"]) for i, r in tagged.items()})
    rows = table(run_dir, "tokenize", "tokens")
    assert rows, "no tokens rows"
    checked = tag_tokens = 0
    for row in rows:
        text, offsets = texts[(row["kind"], row["id"])]
        data = text.encode("utf-8")
        expected, start = [], 0
        for at in offsets:
            assert data[at:at + len(tag.encode("utf-8"))] == tag.encode("utf-8"), f"no tag at {at}"
            expected += as_text.encode(data[start:at].decode("utf-8"), add_special_tokens=False).ids + [tag_id]
            start = at + len(tag.encode("utf-8"))
        expected += as_text.encode(data[start:].decode("utf-8"), add_special_tokens=False).ids + [eos]
        # The end-of-document id only at the end.
        assert expected.count(eos) == 1, f"{row['id']}: an EOS inside the text"
        if row["input_ids"] != expected:
            first = next(i for i, (a, b) in enumerate(zip(row["input_ids"] + [None], expected + [None])) if a != b)
            sys.exit(f"ids differ for {row['kind']} {row['id']!r} at position {first}: "
                     f"ours {row['input_ids'][first:first + 8]} python {expected[first:first + 8]} text {text!r:.200}")
        assert row["n_tokens"] == len(expected)
        count = row["input_ids"].count(tag_id)
        assert row["tag_tokens"] == count
        if row["kind"] == "tagged":
            assert count == tagged[row["id"]]["tags_inserted"], f"{row['id']}: {count} tag ids"
        tag_tokens += count
        checked += 1
    print(json.dumps({"checked": checked, "vocab_size": tok.get_vocab_size(), "tag_id": tag_id,
                      "tag_tokens": tag_tokens}))


if __name__ == "__main__":
    main()
