"""Regenerate (or `--check`) the calibration data moecli ships in `moecli/assets/calibration/`.

    python benchmarks/calibration_data.py            # write the .json.gz files from ../shared/data
    python benchmarks/calibration_data.py --check    # the shipped files read as the originals do

Each shipped file is its original (`shared/data`, see SOURCES.md there and beside the shipped files), the
same records in the same order, each record kept with only the fields calibration reads, as compact
JSON, gzip level 9 with a zero timestamp (the bytes depend on the input alone).
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from moecli.engine.calibration import CALIBRATION_DIR  # noqa: E402

DATA = REPO.parent / "shared" / "data"
# original file -> (shipped file, fields kept, records kept: the first N)
FILES = {
    "counterfact_train.json": ("counterfact_train.json.gz",
                               ("case_id", "prompt", "target_new", "subject", "ground_truth", "rephrase_prompt",
                                "locality_prompt", "locality_ground_truth"), 10000),
    "zsre_train_1k.json": ("zsre_train_1k.json.gz", ("subject", "src", "rephrase", "alt", "answers"), 1000),
}


def trimmed(original: Path, fields: tuple[str, ...], n: int) -> bytes:
    records = json.loads(original.read_text(encoding="utf-8"))[:n]
    text = json.dumps([{k: r[k] for k in fields if k in r} for r in records], ensure_ascii=False,
                      separators=(",", ":"))
    return gzip.compress(text.encode("utf-8"), compresslevel=9, mtime=0)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--check", action="store_true")
    ap.add_argument("--data", type=Path, default=DATA)
    args = ap.parse_args()
    for name, (shipped, fields, n) in FILES.items():
        original = args.data / name
        data = trimmed(original, fields, n)
        target = CALIBRATION_DIR / shipped
        if args.check:
            same = target.read_bytes() == data
            print(f"{shipped}: {'identical to' if same else 'DIFFERS from'} the trimmed {original}")
            if not same:
                return 1
        else:
            target.write_bytes(data)
            print(f"{shipped}: {len(data)} bytes; original sha256 {hashlib.sha256(original.read_bytes()).hexdigest()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
