"""`tuneforge check-data`: build the data exactly as training would and report on it.

Owns the human summary (counts, tokens, loss tokens, packing efficiency, a length
histogram), `--show N` (rendered samples with the trained tokens highlighted) and the
`--json` object whose fields DESIGN.md fixes.
"""

from __future__ import annotations

import json
import sys

import numpy as np

JSON_FIELDS = ("samples", "dropped", "truncated", "tokens", "loss_tokens", "packs", "pack_slots",
               "packing_efficiency", "max_length")
PAIR_FIELDS = ("pairs", "pairs_read", "pairs_dropped", "pairs_truncated", "pairs_identical", "mean_chosen_tokens",
               "mean_rejected_tokens", "row_length")  # preference data: samples/dropped/truncated count pairs, tokens count both members


def histogram(lengths: np.ndarray, max_length: int, bins: int = 8, width: int = 40) -> list[str]:
    """A text histogram of sample lengths."""
    if len(lengths) == 0:
        return []
    edges = np.linspace(0, max_length, bins + 1).astype(int)
    counts, _ = np.histogram(lengths, bins=edges)
    top = max(int(counts.max()), 1)
    return [f"  {edges[i]:>6}-{edges[i + 1]:<6} {'#' * int(round(width * c / top)):<{width}} {c}"
            for i, c in enumerate(counts)]


def render_highlighted(tokenizer, ids: np.ndarray, trained: np.ndarray, color: bool) -> str:
    """Decode a sample, marking trained tokens (green, or «...» without colour)."""
    out, run, state = [], [], None
    for token, flag in zip(ids.tolist(), trained.tolist()):
        if state is not None and flag != state:
            out.append((tokenizer.decode(run), state))
            run = []
        run.append(token)
        state = flag
    if run:
        out.append((tokenizer.decode(run), state))
    if color:
        return "".join(f"\033[32m{t}\033[0m" if f else f"\033[2m{t}\033[0m" for t, f in out)
    return "".join(f"«{t}»" if f else t for t, f in out)


def sample_lengths(data) -> np.ndarray:
    return np.concatenate([np.diff(np.asarray(s.offsets)) for s in data.stores])


def run_check_data(cfg, show: int = 0, as_json: bool = False) -> int:
    from tuneforge.data.dataset import build_data
    from tuneforge.data.summary import count_text, files_lines, warning_lines
    from tuneforge.model.load import load_tokenizer

    tokenizer = load_tokenizer(cfg.model.path, cfg.model.trust_remote_code)
    log = (lambda m: print(m, file=sys.stderr)) if not as_json else (lambda m: None)
    data = build_data(cfg, tokenizer, log=log)
    report = data.report
    if as_json:
        for line in warning_lines(report):
            print(line, file=sys.stderr)
        pairs = {k: report[k] for k in PAIR_FIELDS if k in report}
        print(json.dumps({**{k: report[k] for k in JSON_FIELDS}, "packing": report["packing"],
                          "datasets": report["datasets"], **pairs}))
        return 0
    color = sys.stdout.isatty()
    for row in range(min(show, len(data))):
        for ids, trained, (name, index) in data.row(row):
            print(f"--- sample {index} of {name} ({len(ids)} tokens, {int(trained[1:].sum())} trained)")
            # shift the mask so a token is highlighted where it is a training target
            print(render_highlighted(tokenizer, ids, trained, color))
    r = report
    print(f"samples           {r['samples']:>12,}   ({count_text(r)})")
    if "pairs" in r:
        print(f"pairs             {r['pairs']:>12,}   (read {r['pairs_read']:,}, dropped {r['pairs_dropped']:,}, "
              f"truncated {r['pairs_truncated']:,}, identical once cut {r['pairs_identical']:,}; mean tokens chosen {r['mean_chosen_tokens']:.0f}, "
              f"rejected {r['mean_rejected_tokens']:.0f}; rows hold whole pairs, {r['row_length']} tokens)")
    print(f"tokens            {r['tokens']:>12,}")
    print(f"loss tokens       {r['loss_tokens']:>12,}   ({r['loss_tokens'] / max(r['tokens'], 1):.1%} of tokens)")
    print(f"rows ({r['packing']:<4})       {r['packs']:>12,}   max_length {r['max_length']}")
    print(f"packing efficiency {r['packing_efficiency']:>11.4f}   (real tokens / {r['pack_slots']:,} slots)")
    if len(r["datasets"]) > 1:
        for d in r["datasets"]:
            print(f"  {d['path']}: weight {d['weight']}, {d['samples_used']:,} samples used, {d['tokens']:,} tokens")
    print("files:")
    print("\n".join(files_lines(r)))
    print("sample lengths:")
    print("\n".join(histogram(sample_lengths(data), r["max_length"])))
    for line in warning_lines(r):
        print(line, file=sys.stderr)
    return 0
