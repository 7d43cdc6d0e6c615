"""`lotaqaf plan` for every recipe, as one markdown table (docs/results/plan.md).

    python scripts/plan_table.py                 # every recipe, planned for one GPU (bf16 activations)
    python scripts/plan_table.py --device cpu    # ... for a CPU run instead

Each row is a recipe (the 70B also at 4 bits): GB per stage, the peak, and the smallest single GPU
whose memory holds the peak. Offline, the hub models' shapes come from data/model_configs.json.
"""

from __future__ import annotations

import argparse

from lotaqaf_cli.config import compose, list_recipes
from lotaqaf_cli.session import pick_device
from lotaqaf_cli.stages.plan import for_config, summary

EXTRA = {"llama33_70b_mmlu": [[], ["quant.bits=4"]], "qwen25_32b_mmlu": [[], ["quant.bits=4"]]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    args = ap.parse_args()
    device = ["plan.device_gb=1000"] if args.device == "cuda" else ["device=cpu"]
    stages = ("quantize", "train", "ppl", "merge", "eval")
    print("| recipe | bits | " + " | ".join(f"{s} GB" for s in stages)
          + " | train, checkpointing switched GB | peak GB | smallest single GPU |")
    print("|---|---|" + "---|" * (len(stages) + 3))
    for name, _ in list_recipes():
        if name == "smoke":
            continue
        for extra in EXTRA.get(name, [[]]):
            cfg = compose([f"recipe={name}", "stages=[quantize,train,ppl,merge,eval]", *device, *extra])
            p, _, _ = for_config(cfg, list(cfg.stages), pick_device(cfg))
            s = summary(p, None)
            cells = [f"{s['stages'][k]['gb']:.1f}" for k in stages]
            other = next(k for k in s if k.startswith("train_checkpointing_"))
            cells.append(f"{s[other]:.1f} ({other.split('_')[2]})")
            print(f"| {name} | {cfg.quant.bits} | " + " | ".join(cells) + f" | {s['peak_gb']:.1f} | "
                  f"{s['smallest_gpu'] or 'none single'} |")


if __name__ == "__main__":
    main()
