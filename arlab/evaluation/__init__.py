"""``arlab eval``: scoring a generator run (sweeps of sampling settings, chunked and resumable), a tokenizer
run (reconstruction PSNR / SSIM / codebook usage / rFID) or two image sets against each other, into
``<run>/eval/<name>.json`` (format: docs/evaluation.md, "arlab eval")."""
