"""Data pipeline speed: packing (images/s) and the shard loader (images/s by worker count).

    python benchmarks/bench_data.py [--cifar ../shared/data/cifar10-jpg.tar.gz] [--batches 100]

Packs CIFAR-10 when the archive is present (else the shapes set), then streams the train split
through the rank-balanced loader with 0, 1 and 2 workers. Numbers depend on the machine; compare
ratios measured in the same run.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from arlab.data.datamodule import ShardDataModule
from arlab.data.pack import pack_imagefolder
from arlab.data.shapes import write_shapes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cifar", default=str(Path(__file__).resolve().parents[1].parent / "shared" / "data"
                                           / "cifar10-jpg.tar.gz"))
    ap.add_argument("--batches", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=128)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "shards"
        t0 = time.perf_counter()
        if Path(args.cifar).exists():
            m = pack_imagefolder(args.cifar, out, progress=False)
            what = "CIFAR-10 pack (JPEG verify + write)"
        else:
            m = write_shapes(out, n_train=10000, n_test=1000)
            what = "shapes generate + write"
        n = sum(s["count"] for s in m["splits"].values())
        dt = time.perf_counter() - t0
        print(f"{what}: {n} images in {dt:.1f} s = {n / dt:.0f} images/s")
        base = None
        for workers in (0, 1, 2):
            cfg = ShardDataModule.Config(root=str(out), batch_size=args.batch_size, num_workers=workers,
                                         val_split="")
            loader = ShardDataModule(cfg).train_dataloader()
            it = iter(loader)
            next(it)  # worker start-up and shuffle-buffer fill are not steady-state
            t0 = time.perf_counter()
            k = min(args.batches, len(loader) - 1)
            for _ in range(k):
                next(it)
            rate = k * args.batch_size / (time.perf_counter() - t0)
            base = base or rate
            print(f"loader, {workers} worker(s): {rate:.0f} images/s ({rate / base:.2f}x of 0 workers)")


if __name__ == "__main__":
    main()
