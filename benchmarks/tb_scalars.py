"""Print the last value of TensorBoard scalars of run directories (a quick look without a browser).

    python benchmarks/tb_scalars.py runs/shapes-tokenizer-fsq [more runs] [--tags val/psnr,val/usage]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--tags", default="val/psnr,val/ssim,val/usage,train/rec,perf/train_images_per_s")
    args = ap.parse_args()
    for run in args.runs:
        ev = EventAccumulator(str(Path(run) / "tb"), size_guidance={"scalars": 0})
        ev.Reload()
        print(run)
        for tag in args.tags.split(","):
            if tag in ev.Tags()["scalars"]:
                pts = ev.Scalars(tag)
                trail = ", ".join(f"{p.step}:{p.value:.4g}" for p in pts[-6:])
                print(f"  {tag:<28} {trail}")


if __name__ == "__main__":
    main()
