"""A few QLoRA steps of the quick-start model on the CPU (bitsandbytes 4-bit NF4).

    python examples/qlora_smollm2_cpu.py [MODEL_DIR] [--steps N] [--work-dir DIR]

MODEL_DIR defaults to `.cache/smollm2-135m-instruct` (what `scripts/demo.sh` imports). It
trains the shipped quick-start recipe (`smollm2_135m_gsm8k_lora_cpu.yaml`: LoRA r=16 on every
linear layer, GSM8K excerpt, 512-token packed rows) with `model.quantization: {bits: 4}`,
merges the adapter into a plain fp32 folder with `tuneforge export --merge-lora`, and prints
the step losses, the time, the peak resident memory and what `tuneforge plan` predicted.
Needs `pip install bitsandbytes` (>= 0.50). Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", nargs="?", default=".cache/smollm2-135m-instruct")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--work-dir", default="runs/example-qlora-smollm2")
    args = parser.parse_args()

    from tuneforge.cli import main as tuneforge
    from tuneforge.config import load_config
    from tuneforge.plan import estimate, model_shape, setup_from_config
    from tuneforge.recipes import __file__ as recipes_init

    recipe = Path(recipes_init).parent / "smollm2_135m_gsm8k_lora_cpu.yaml"
    work = Path(args.work_dir)
    overrides = [f"model.path={args.model_dir}", "model.quantization.bits=4", f"train.max_steps={args.steps}",
                 "train.save_every=0", f"train.work_dir={work}"]
    started = time.time()
    code = tuneforge(["train", str(recipe), *overrides, "--force"])
    seconds = time.time() - started
    if code != 0:
        return code
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # Linux: KiB
    cfg = load_config(recipe, overrides)
    planned_gb = estimate(model_shape(cfg.model.path), setup_from_config(cfg, None, None))["total"]
    losses = [round(json.loads(line)["loss"], 4) for line in (work / "metrics.jsonl").read_text().splitlines()
              if '"loss"' in line]
    code = tuneforge(["export", str(work / "final"), str(work / "merged"), "--merge-lora"])
    print(json.dumps({"steps": len(losses), "losses": losses, "train_s": round(seconds, 1),
                      "peak_rss_gb": round(peak_gb, 3), "plan_gb": round(planned_gb, 3),
                      "merged": str(work / "merged") if code == 0 else None}), file=sys.stdout)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
