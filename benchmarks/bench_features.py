"""Feature-network speed: seconds per 1,000 images of each registered feature network, the cost of every
FID / KID / precision-recall number ``arlab eval`` computes (samples and, once per cache key, the reference).

    python benchmarks/bench_features.py                        # inception, and the classifiers that exist
    python benchmarks/bench_features.py inception --n 200      # one network, 200 images
    python benchmarks/bench_features.py --json docs/results/feature-speed.json

Images are uint8 32×32 (shapes and CIFAR-10 size; Inception resizes them to 299 px itself, so its cost does not
depend on the input size), random, in batches of ``--batch`` (``arlab eval``'s default, 64). Each network runs
one warm-up batch, then ``--n`` images. A network whose weights are missing (the ``eval`` extra not installed, a
classifier not trained) is listed with the one-line reason instead of a time.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from common import print_table, write_json

from arlab.config import build, presets
from arlab.errors import ConfigError


def time_network(name: str | dict, n: int, batch: int, image_size: int = 32) -> dict:
    """Seconds per 1,000 images of feature network ``name`` (a preset or a config node), or the reason it
    cannot run."""
    images = np.random.default_rng(0).integers(0, 256, (n + batch, image_size, image_size, 3), dtype=np.uint8)
    try:
        net = build("features", name, where="bench_features")
        net.features_and_logits(images[:batch], batch, remember=False)  # loads the weights; the warm-up batch
    except (ConfigError, FileNotFoundError) as e:
        return {"features": name, "skipped": str(e).splitlines()[0]}
    t0 = time.perf_counter()
    feats = net.features_and_logits(images[batch:], batch, remember=False)[0]
    dt = time.perf_counter() - t0
    assert feats.shape == (n, net.dim), feats.shape
    return {"features": name, "identity": net.identity(), "dim": net.dim, "n": n, "batch": batch,
            "threads": torch.get_num_threads(), "seconds": round(dt, 3), "images_per_s": round(n / dt, 2),
            "s_per_1000": round(1000 * dt / n, 2)}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("features", nargs="*", help="feature network presets (default: every one registered)")
    ap.add_argument("--n", type=int, default=256, help="images timed per network (default 256)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--json", default="")
    args = ap.parse_args(argv)
    names = args.features or sorted(presets("features"))
    rows = [time_network(name, args.n, args.batch) for name in names]
    out = {"torch": torch.__version__, "threads": torch.get_num_threads(), "rows": rows}
    print_table(f"feature networks, {args.n} random 32x32 images, batch {args.batch}, "
                f"{torch.get_num_threads()} threads, torch {torch.__version__}",
                ["features", "dim", "images/s", "s per 1,000 images"],
                [[r["features"], str(r.get("dim", "-")), str(r.get("images_per_s", "-")),
                  str(r.get("s_per_1000", r.get("skipped")))] for r in rows])
    write_json(args.json, out)
    return out


if __name__ == "__main__":
    main()
