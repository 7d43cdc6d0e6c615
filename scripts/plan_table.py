"""`lotaqaf plan` for every recipe, as one markdown table (docs/results/plan.md).

    python scripts/plan_table.py                 # every recipe, planned for one GPU (bf16 activations)
    python scripts/plan_table.py --device cpu    # ... for a CPU run instead

Each row is a recipe (the 70B also at 4 bits): GB per stage, the peak, and the smallest single GPU
whose memory holds the peak, each planned for that GPU (the calibration activations go to host memory
where they would not fit it: quant.activations=auto). Offline, the hub models' shapes come from data/model_configs.json.
"""

from __future__ import annotations

import argparse

from lotaqaf_cli.config import compose, list_recipes
from lotaqaf_cli.session import pick_device
from lotaqaf_cli.stages.plan import for_config, summary

EXTRA = {"llama33_70b_mmlu": [[], ["quant.bits=4"]], "qwen25_32b_mmlu": [[], ["quant.bits=4"]]}


def smallest_fit(name: str, extra: list[str], device: list[str]) -> tuple[dict, str | None]:
    """The plan's record for the smallest single GPU (core.plan.GPUS) that runs every stage, planned for that
    GPU (quant.activations=auto moves the calibration activations to host memory when they do not fit it);
    on no GPU of the list: the plan for the largest, and None."""
    from lotaqaf_cli.core.plan import GPUS

    stages = "stages=[quantize,train,ppl,merge,eval]"
    sizes = [None] if device == ["device=cpu"] else [gb for _, gb in GPUS]
    for gb in sizes:
        cfg = compose([f"recipe={name}", stages, *device, *extra, *([f"plan.device_gb={gb}"] if gb else [])])
        p, _, _ = for_config(cfg, list(cfg.stages), pick_device(cfg))
        s = summary(p, gb)
        if gb is None or s["peak_gb"] <= gb:
            return s, s["smallest_gpu"] if gb else None
    return s, None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    args = ap.parse_args()
    device = [] if args.device == "cuda" else ["device=cpu"]
    stages = ("quantize", "train", "ppl", "merge", "eval")
    print("| recipe | bits | " + " | ".join(f"{s} GB" for s in stages)
          + " | train, checkpointing switched GB | peak GB | calibration activations | host GB (quantize)"
          " | smallest single GPU |")
    print("|---|---|" + "---|" * (len(stages) + 5))
    for name, _ in list_recipes():
        if name == "smoke":
            continue
        for extra in EXTRA.get(name, [[]]):
            s, gpu = smallest_fit(name, extra, device)
            cells = [f"{s['stages'][k]['gb']:.1f}" for k in stages]
            other = next(k for k in s if k.startswith("train_checkpointing_"))
            cells.append(f"{s[other]:.1f} ({other.split('_')[2]})")
            host = s["stages"]["quantize"].get("host_gb", 0.0)
            bits = next((e.split("=")[1] for e in extra if e.startswith("quant.bits=")), None) or \
                compose([f"recipe={name}"]).quant.bits
            print(f"| {name} | {bits} | " + " | ".join(cells) + f" | {s['peak_gb']:.1f} | "
                  f"{s['calibration_activations']} | {host:.1f} | {gpu or 'none single'} |")


if __name__ == "__main__":
    main()
