"""Generate the offline data lotaqaf ships for the embedded model (lotaqaf_cli/data/shipped/).

    .venv/bin/python scripts/make_shipped_data.py            # all three roles, one CPU thread
    .venv/bin/python scripts/make_shipped_data.py --check    # regenerate in memory, compare with the files

The 16-bit model samples calibration text, held-out text and self-distilled answers exactly as
`calib=self`, `ppl.source=self` and `data=self_distill` do, with the recipe's settings and seeds, at
one thread (sampling depends on the thread count). About 15 minutes on this 2-core machine.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from lotaqaf_cli.config import compose
from lotaqaf_cli.data import selfgen, sft, shipped
from lotaqaf_cli.io.files import write_text_atomic
from lotaqaf_cli.io.models import load_model
from lotaqaf_cli.io.rundir import versions

MODEL = "embedded:smollm2"
COMMAND = "python scripts/make_shipped_data.py"


def generate(role: str, cfg, lm) -> tuple[dict, str, list]:
    """(header settings, payload key, payload) for one role, as the self sources would make it."""
    if role == "train":
        d = cfg.data
        recs = sft.self_distill_records(lm.model, lm.tokenizer, d.n_samples, d.target_len, d.seed)
        return {"n_samples": d.n_samples, "target_len": d.target_len, "seed": d.seed}, "records", recs
    sec = cfg.calib if role == "calib" else cfg.ppl
    w = selfgen.self_text_windows(lm.model, lm.tokenizer, role, sec.n_samples, sec.seq_len, sec.seed)
    return {"n_samples": sec.n_samples, "seq_len": sec.seq_len, "seed": sec.seed}, "windows", w.tolist()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--roles", nargs="+", default=list(shipped.ROLES), choices=shipped.ROLES)
    p.add_argument("--check", action="store_true", help="compare the regenerated payloads with the files")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    cfg = compose(["recipe=smollm2_mmlu", "calib=self", "data=self_distill", "ppl.source=self"])
    lm = load_model(MODEL, cfg.model.dtype)
    bad = 0
    for role in args.roles:
        t0 = time.time()
        torch.manual_seed(cfg.seed)
        settings, key, payload = generate(role, cfg, lm)
        secs = round(time.time() - t0, 1)
        path = shipped.path_for(MODEL, role)
        if args.check:
            header, have = shipped.read(MODEL, role, lm.source_hash)
            same = have == payload
            bad += not same
            print(f"{role}: {'identical to' if same else 'DIFFERS from'} {path} ({secs} s)")
            continue
        header = {"role": role, "model": MODEL, "model_hash": lm.source_hash, **settings,
                  "generated_by": COMMAND, "threads": torch.get_num_threads(), "seconds": secs,
                  "versions": {k: v for k, v in versions().items() if k in ("python", "torch", "transformers")}}
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, shipped.dumps(header, key, payload))
        print(f"{role}: wrote {path} ({path.stat().st_size} bytes, {secs} s)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
