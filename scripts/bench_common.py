"""Pieces shared by the benchmark and scale scripts (imported from scripts/, the running
script's folder): FineWeb's Parquet schema, and a local S3 server (moto) for a measurement."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def fineweb_schema():
    """FineWeb's columns and types (text, id and its metadata fields)."""
    import pyarrow as pa

    return pa.schema(
        [
            ("text", pa.string()),
            ("id", pa.string()),
            ("dump", pa.string()),
            ("url", pa.string()),
            ("date", pa.string()),
            ("file_path", pa.string()),
            ("language", pa.string()),
            ("language_score", pa.float64()),
            ("token_count", pa.int64()),
        ]
    )


@contextlib.contextmanager
def local_s3(bucket: str, base_env: dict | None = None):
    """Starts `moto_server` on a free port of 127.0.0.1 with `bucket` created; yields (the
    environment safepipe needs to reach it, a boto3 client). The server is stopped on exit."""
    import boto3

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    server = subprocess.Popen(
        [str(REPO / ".venv" / "bin" / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    env = dict(
        base_env if base_env is not None else os.environ,
        AWS_ACCESS_KEY_ID="test",
        AWS_SECRET_ACCESS_KEY="test",
        AWS_REGION="us-east-1",
        AWS_ENDPOINT=f"http://127.0.0.1:{port}",
        AWS_ALLOW_HTTP="true",
    )
    try:
        client = boto3.client(
            "s3",
            endpoint_url=env["AWS_ENDPOINT"],
            aws_access_key_id="test",
            aws_secret_access_key="test",
            region_name="us-east-1",
        )
        for attempt in range(150):
            try:
                client.create_bucket(Bucket=bucket)
                break
            except Exception:
                if attempt == 149:
                    raise
                time.sleep(0.2)
        yield env, client
    finally:
        server.kill()
        server.wait()


def generate_rate(args: list[str], stdin: str | None = None) -> dict:
    """Runs `safepipe generate` with `args`; returns the tokens and seconds of its summary line
    (`N tokens in S s`: decoding only, model load excluded)."""
    import re

    run = subprocess.run(args, input=stdin, capture_output=True, text=True, check=True)
    m = re.search(r"(\d+) tokens in ([\d.]+)s", run.stderr)
    return {"tokens": int(m.group(1)), "seconds": float(m.group(2))}
