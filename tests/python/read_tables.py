"""Reads a run directory's tables as users' own tools do: every `*.parquet` in a stage's table
folder, with pyarrow datasets (no safepipe code). Prints {table: [row count, sorted ids]}.

Usage: read_tables.py RUN_DIR STAGE/TABLE [STAGE/TABLE ...]
"""
import json
import sys
from pathlib import Path

import pyarrow.dataset as ds


def main() -> None:
    run_dir = Path(sys.argv[1])
    report = {}
    for table in sys.argv[2:]:
        folder = run_dir / table
        files = sorted(str(p) for p in folder.glob("*.parquet"))
        if not files:
            report[table] = {"rows": 0, "ids": []}
            continue
        data = ds.dataset(files, format="parquet").to_table()
        ids = sorted(data.column("id").to_pylist()) if "id" in data.column_names else []
        report[table] = {"rows": data.num_rows, "ids": ids, "files": len(files)}
    print(json.dumps(report))


if __name__ == "__main__":
    main()
