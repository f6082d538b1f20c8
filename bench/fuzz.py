"""``make fuzz``: 100,000 seeded hostile records through the worker's decoding and evaluation.

Writes bench/results/fuzz.json: ``{"records", "accepted", "rejected_by_kind", "engine_errors",
"crashes", "max_ms", "peak_rss_mib"}`` (see tests/fuzzing.py for the corpus and what counts as a
crash) and exits 1 if anything crashed.

    python bench/fuzz.py [--records N] [--seed S] [--engine incremental|reference] [--out PATH]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the corpus is the suite's (tests/fuzzing.py)
sys.path.insert(1, str(ROOT))

from fuzzing import fuzz  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--engine", choices=["incremental", "reference"], default="incremental")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "fuzz.json"))
    args = parser.parse_args()
    started = time.monotonic()
    counts = fuzz(args.records, seed=args.seed, engine=args.engine)
    result = {**counts.as_json(), "seed": args.seed, "engine": args.engine,
              "seconds": round(time.monotonic() - started, 1)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))
    for example in counts.crash_examples:
        print("crash:", example, file=sys.stderr)
    return 1 if counts.crashes else 0


if __name__ == "__main__":
    sys.exit(main())
