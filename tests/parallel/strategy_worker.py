"""Run by the multi-process tests under torchrun: several trainings, one after another, in one
process group (each launch costs seconds of imports and rendezvous; a tiny training far less).

Usage: torchrun ... strategy_worker.py SPEC [SPEC ...], a SPEC being CONFIG.yaml or
CONFIG.yaml=DEEPSPEED (what `--deepspeed DEEPSPEED` takes). Each strategy is chosen as
`tuneforge train` chooses it (`resolve_strategy` + `build_context`).
"""

import os
import sys
import time
from pathlib import Path

from tuneforge.config import load_config
from tuneforge.parallel.launch import init_distributed, launch_env
from tuneforge.train.loop import train
from tuneforge.train.run import build_context, resolve_strategy


def main(specs: list[str]) -> int:
    env = launch_env("pytorch", os.environ)
    with init_distributed(env, timeout_s=120) as dist_ctx:
        for spec in specs:
            config, _, deepspeed = spec.partition("=")
            started = time.time()
            cfg = load_config(config, [])
            strategy = resolve_strategy(cfg.parallel, env.world_size, deepspeed or None)
            ctx = build_context(cfg, dist_ctx, strategy, deepspeed or None)
            work_dir = Path(cfg.train.work_dir)
            work_dir.mkdir(parents=True, exist_ok=True)
            code = train(cfg, work_dir=work_dir, ctx=ctx, log=lambda message: None)
            if code != 0:
                return code
            if ctx.is_main:
                print(f"done {config}: {ctx!r} in {time.time() - started:.1f}s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
