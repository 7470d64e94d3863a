"""Data pipeline benchmark: 100k synthetic chat samples tokenized + packed, then the cached rerun.

    python benchmarks/data_bench.py --tokenizer .cache/smollm2-135m-instruct [--samples 100000]

Each phase runs in its own subprocess so its peak RSS is its own. Prints a table and writes
benchmarks/results/data_bench.json. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORDS = ("the a one two three four five apples oranges train station minutes each how many more than "
         "she he they bought sold gave left total price dollars cents per hour day week because so then").split()


def synthetic(path: Path, n: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    with path.open("w") as handle:
        for _ in range(n):
            turns = rng.randint(1, 3)
            messages = [{"role": "system", "content": "You are a helpful assistant."}] if rng.random() < 0.3 else []
            for _ in range(turns):
                messages.append({"role": "user", "content": " ".join(rng.choices(WORDS, k=rng.randint(8, 60)))})
                messages.append({"role": "assistant", "content": " ".join(rng.choices(WORDS, k=rng.randint(10, 200)))})
            handle.write(json.dumps({"messages": messages}) + "\n")


def phase(config: str) -> None:
    from tuneforge.config import load_config
    from tuneforge.data.dataset import build_data
    from tuneforge.model.load import load_tokenizer

    cfg = load_config(config)
    tokenizer = load_tokenizer(cfg.model.path)
    started = time.time()
    data = build_data(cfg, tokenizer)
    seconds = time.time() - started
    from tuneforge.train.rankstats import peak_rss_bytes

    peak_mb = peak_rss_bytes() / 2**20
    print(json.dumps({"seconds": seconds, "peak_rss_mb": peak_mb, **{k: data.report[k] for k in
                      ("samples", "tokens", "packs", "packing_efficiency")}}))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("--samples", type=int, default=100_000)
    parser.add_argument("--template", default="chatml")
    parser.add_argument("--phase", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase:
        return phase(args.phase)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        synthetic(tmp / "chat.jsonl", args.samples)
        config = tmp / "bench.yaml"
        config.write_text(json.dumps({
            "model": {"path": str(Path(args.tokenizer).resolve())},
            "data": {"datasets": [{"path": str(tmp / "chat.jsonl"), "format": "openai"}], "template": args.template,
                     "max_length": 2048, "packing": "soft", "cache_dir": str(tmp / "cache")}}))
        results = {}
        for name in ("first run (tokenize + pack)", "cached rerun"):
            out = subprocess.run([sys.executable, __file__, "--tokenizer", args.tokenizer, "--phase", str(config)],
                                 capture_output=True, text=True, check=True)
            results[name] = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"{'phase':<30} {'seconds':>8} {'peak RSS MB':>12} {'samples':>9} {'tokens':>12} {'efficiency':>10}")
    for name, r in results.items():
        print(f"{name:<30} {r['seconds']:>8.2f} {r['peak_rss_mb']:>12.0f} {r['samples']:>9,} {r['tokens']:>12,} "
              f"{r['packing_efficiency']:>10.4f}")
    out_dir = Path(__file__).parent / "results"
    out_dir.mkdir(exist_ok=True)
    (out_dir / "data_bench.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
