"""Preprocessing throughput: a cold cache against a warm one, in one run.

    python benchmarks/preprocess_cache.py [--data DIR] [--repeats 3]

Each repeat uses a fresh, empty cache: the cold pass discovers, reads, fingerprints and
preprocesses every volume (in worker processes); the warm pass runs the same call again and finds
everything cached. A serial cold pass (one process) is the baseline for the parallel speed-up.
Reports medians over the repeats, as volumes/s and as ratios.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from medsynth.config import load_config
from medsynth.pipeline import prepare_dataset

DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "train" / "ixi-t1"


def timed(folder: Path, config, cache: Path) -> tuple[float, int, int]:
    start = time.perf_counter()
    prepared = prepare_dataset(folder, config, cache)
    return time.perf_counter() - start, len(prepared.entries), prepared.built


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="config override")
    args = parser.parse_args()
    if not args.data.is_dir():
        raise SystemExit(f"no data at {args.data}: pass --data")

    parallel = load_config(None, args.overrides)
    serial = load_config(None, [*args.overrides, "cache.workers=1"])
    cold, warm, cold_serial = [], [], []
    volumes = 0
    for repeat in range(args.repeats):
        with tempfile.TemporaryDirectory() as tmp:
            seconds, volumes, built = timed(args.data, serial, Path(tmp) / "serial")
            cold_serial.append(seconds)
            seconds, volumes, built = timed(args.data, parallel, Path(tmp) / "cache")
            assert built == volumes, "cold pass found a cache it should not have"
            cold.append(seconds)
            seconds, _, built = timed(args.data, parallel, Path(tmp) / "cache")
            assert built == 0, "warm pass rebuilt volumes"
            warm.append(seconds)
        print(f"repeat {repeat + 1}: cold serial {cold_serial[-1]:.2f} s, cold {cold[-1]:.2f} s, warm {warm[-1]:.3f} s")

    median = statistics.median
    print(f"\n{volumes} volumes from {args.data}, median of {args.repeats} repeats")
    print(f"  cold, 1 process     : {median(cold_serial):7.2f} s  {volumes / median(cold_serial):8.1f} volumes/s")
    print(f"  cold, worker pool   : {median(cold):7.2f} s  {volumes / median(cold):8.1f} volumes/s")
    print(f"  warm (all cached)   : {median(warm):7.3f} s  {volumes / median(warm):8.1f} volumes/s")
    print(f"  warm / cold speed   : {median(cold) / median(warm):7.1f}x")
    print(f"  pool / serial speed : {median(cold_serial) / median(cold):7.2f}x")


if __name__ == "__main__":
    main()
