"""Fault injection: SIGKILL a tiny training run at random moments, resume each time, and
check that the final loss curve equals an uninterrupted run's, bit for bit (CPU, fp32).

    python tests/stress/kill_resume.py --kills 20 [--seed 0] [--work DIR]

Kills land anywhere: mid-step, mid-save (save_every=1 saves every step), mid-prune
(keep_last=1 prunes every step). After each kill the run resumes from its latest complete
checkpoint (or starts over if none was complete yet). Exits non-zero on any difference.
The test suite runs a 3-kill version of this (tests/train/test_kill_resume.py).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))


def prepare(work: Path, steps: int) -> tuple[Path, Path]:
    """A tiny model, data and two configs (reference and faulty) under `work`."""
    from helpers import alpaca_records, build_tokenizer, make_tiny_model, write_config, write_jsonl

    model = make_tiny_model(work / "model", build_tokenizer())
    write_jsonl(work / "d.jsonl", alpaca_records(200))
    common = dict(model={"path": str(model), "lora": {"r": 4, "alpha": 8, "dropout": 0.1}},
                  data={"max_length": 96, "cache_dir": str(work / "cache")})
    configs = []
    for name in ("reference", "faulty"):
        train = {"max_steps": steps, "micro_batch_size": 2, "lr": 1e-3, "seed": 5, "work_dir": str(work / name),
                 "save_every": 1, "keep_last": 1}
        sub = work / name
        sub.mkdir(parents=True, exist_ok=True)
        configs.append(write_config(sub / "c.yaml", model, [{"path": str(work / "d.jsonl"), "format": "alpaca"}],
                                    train=train, **common))
    return configs[0], configs[1]


def losses(run_dir: Path) -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def train(config: Path, resume: bool) -> subprocess.Popen:
    args = [sys.executable, "-m", "tuneforge", "train", str(config), "--resume" if resume else "--force"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)


def has_checkpoint(run_dir: Path) -> bool:
    from tuneforge.train.checkpoint import latest_checkpoint

    return latest_checkpoint(run_dir / "checkpoints") is not None


def run(kills: int, seed: int, work: Path, steps: int = 24) -> dict:
    rng = random.Random(seed)
    reference_cfg, faulty_cfg = prepare(work, steps)
    started = time.time()
    proc = train(reference_cfg, resume=False)
    if proc.wait() != 0:
        raise SystemExit(f"reference run failed: {proc.stderr.read().decode()[-2000:]}")
    reference = losses(reference_cfg.parent)
    one_run = time.time() - started
    done = 0
    while True:
        proc = train(faulty_cfg, resume=has_checkpoint(faulty_cfg.parent))
        if done < kills:
            time.sleep(rng.uniform(0.5, max(one_run, 1.0)))
            if proc.poll() is None:
                proc.kill()
                proc.wait()
                done += 1
                print(f"kill {done}/{kills}", flush=True)
                continue
        code = proc.wait()
        if code != 0:
            raise SystemExit(f"a resumed run failed (exit {code}): {proc.stderr.read().decode()[-2000:]}")
        if done >= kills:
            break
        # it finished before the kill landed: start over so the remaining kills still land
        shutil.rmtree(faulty_cfg.parent / "final", ignore_errors=True)
        shutil.rmtree(faulty_cfg.parent / "checkpoints", ignore_errors=True)
    got = losses(faulty_cfg.parent)
    same = got == reference
    return {"kills": done, "steps": steps, "identical": same, "reference": reference, "resumed": got}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--work", type=Path, default=None)
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="tuneforge-stress-"))
    result = run(args.kills, args.seed, work, args.steps)
    print(f"{result['kills']} kills survived; loss curve over {result['steps']} steps identical: {result['identical']}")
    return 0 if result["identical"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
