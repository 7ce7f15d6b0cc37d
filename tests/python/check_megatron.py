#!/usr/bin/env python3
"""Oracle for `safepipe export megatron`: read PREFIX.idx / PREFIX.bin the way Megatron-LM's
indexed dataset does (numpy memmap over the MMIDIDX layout) and compare with the shards.

usage: check_megatron.py PREFIX MANIFEST_JSON
Prints one JSON summary; exits non-zero on any mismatch.
"""
import json
import os
import struct
import sys

import numpy as np
import pyarrow.parquet as pq

DTYPES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.float32,
          8: np.uint16}


def main():
    prefix, manifest_path = sys.argv[1:3]
    manifest = json.load(open(manifest_path))
    # Shard files are named relative to the run directory (the manifest is RUN_DIR/pack/manifest.json).
    run_dir = os.path.dirname(os.path.dirname(os.path.abspath(manifest_path)))
    with open(prefix + ".idx", "rb") as f:
        assert f.read(9) == b"MMIDIDX\x00\x00", "bad magic"
        (version,) = struct.unpack("<Q", f.read(8))
        assert version == 1
        (code,) = struct.unpack("<B", f.read(1))
        dtype = DTYPES[code]
        (sequences,) = struct.unpack("<Q", f.read(8))
        (documents,) = struct.unpack("<Q", f.read(8))
        offset = f.tell()
    index = np.memmap(prefix + ".idx", mode="r", order="C")
    lengths = np.frombuffer(index, dtype=np.int32, count=sequences, offset=offset)
    pointers = np.frombuffer(index, dtype=np.int64, count=sequences, offset=offset + lengths.nbytes)
    doc_index = np.frombuffer(index, dtype=np.int64, count=documents,
                              offset=offset + lengths.nbytes + pointers.nbytes)
    assert index.size == offset + lengths.nbytes + pointers.nbytes + doc_index.nbytes, "trailing bytes in .idx"
    bin_ = np.memmap(prefix + ".bin", mode="r", order="C")
    width = np.dtype(dtype).itemsize
    assert pointers[0] == 0 and np.all(pointers[1:] == np.cumsum(lengths[:-1].astype(np.int64) * width))
    assert doc_index[0] == 0 and doc_index[-1] == sequences and np.all(np.diff(doc_index) > 0)
    stream = np.frombuffer(bin_, dtype=dtype)
    assert stream.size == lengths.sum() == manifest["tokens"], (stream.size, lengths.sum(), manifest["tokens"])
    expected = np.concatenate([
        np.concatenate(pq.read_table(os.path.join(run_dir, s["file"]), columns=["input_ids"]).column(0).to_numpy(zero_copy_only=False))
        for s in manifest["shards"]])
    assert np.array_equal(stream.astype(np.int64), expected.astype(np.int64)), "token streams differ"
    # Every sequence read back through its pointer equals the same slice of the stream.
    for i in range(0, sequences, max(1, sequences // 50)):
        start = pointers[i] // width
        seq = np.frombuffer(bin_, dtype=dtype, count=lengths[i], offset=int(pointers[i]))
        assert np.array_equal(seq, stream[start:start + lengths[i]])
    eos = manifest["tokenizer"]["eos_id"]
    # Each document but the last one packed ends with EOS (the tail is cut away).
    ends = np.cumsum(lengths)[doc_index[1:-1] - 1] - 1
    assert np.all(stream[ends] == eos), "a document does not end with EOS"
    print(json.dumps({"tokens": int(stream.size), "sequences": int(sequences), "documents": int(documents - 1),
                      "dtype": np.dtype(dtype).name}))


if __name__ == "__main__":
    main()
