"""What reuse saves: extraction cost of a first run, a re-split, a relabel, and +10% images.

    python benchmarks/reuse.py [--n 64] [--backbones lite_trio] [--weights packaged]

Runs ``ray_jobs.extract`` (the real job, one local Ray instance) on a demo dataset of ``n``
images into a fresh store, then again after (1) moving a quarter of the test ids to train,
(2) changing one image's votes, (3) adding 10% more images. Features belong to images, so (1)
and (2) must cost 0 forward passes and (3) only the new images. Each step reports its wall
seconds, forward passes and computed rows; the ratios are against the first run of the same
process. Last stdout line: JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ray_jobs.config import load_config  # noqa: E402
from ray_jobs.extract import ExtractConfig, main as extract  # noqa: E402
from ray_jobs.make_demo_data import generate  # noqa: E402


def step(data: Path, store: Path, args) -> dict:
    cfg = load_config(ExtractConfig, None, [f"dataset.path={data}", f"store={store}", f"backbones=[{args.backbones}]",
                                            f"weights={args.weights}", "workers=1", "cpus_per_worker=2"])
    started = time.perf_counter()
    result = extract(cfg)
    return {"seconds": round(time.perf_counter() - started, 2), "forward_passes": result["forward_passes"],
            "computed_rows": result["computed_rows"], "rows": result["rows"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--backbones", default="lite_trio")
    parser.add_argument("--weights", default="packaged")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data, store = Path(tmp) / "data", Path(tmp) / "store"
        generate(data, args.n)
        steps = {"first": step(data, store, args)}

        test_list = data / "generic_test.jpgl"
        test_ids = test_list.read_text().split()
        test_list.write_text("\n".join(test_ids[len(test_ids) // 4:]) + "\n")
        steps["resplit"] = step(data, store, args)

        lines = (data / "AVA.txt").read_text().splitlines()
        fields = lines[0].split()
        fields[2] = str(int(fields[2]) + 5)
        (data / "AVA.txt").write_text("\n".join([" ".join(fields), *lines[1:]]) + "\n")
        steps["relabel"] = step(data, store, args)

        grown = Path(tmp) / "grown"
        generate(grown, args.n + max(1, args.n // 10))  # the generator is per index: the first n are the same
        steps["grow_10pct"] = step(grown, store, args)

    first = steps["first"]["seconds"]
    for name, s in steps.items():
        print(f"{name:>10}: {s['seconds']:7.1f} s, {s['forward_passes']:4d} forward passes, "
              f"{s['computed_rows']:4d} of {s['rows']} images computed", file=sys.stderr)
    print(json.dumps({"n": args.n, "backbones": args.backbones, **{f"{k}_{f}": v[f] for k, v in steps.items()
                                                                    for f in ("seconds", "forward_passes", "computed_rows")},
                      **{f"{k}_vs_first_seconds": round(v["seconds"] / first, 3) for k, v in steps.items() if k != "first"}}))


if __name__ == "__main__":
    main()
