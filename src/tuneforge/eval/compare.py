"""`tuneforge eval --compare A.json B.json`: the difference between two evaluations, and whether
it is significant.

Both must score the same samples (same data, metric and references). Generation metrics:
McNemar's exact test on the samples exactly one of the two got right. `loss`: the sign test
on the samples where one has the lower loss. Significant means p < 0.05 (two-sided).
"""

from __future__ import annotations

from tuneforge.errors import UserError
from tuneforge.eval.report import read_report
from tuneforge.eval.stats import exact_binomial_p

ALPHA = 0.05


def _paired(a_records: list[dict], b_records: list[dict], a_name: str, b_name: str) -> list[tuple[dict, dict]]:
    a_by = {r["index"]: r for r in a_records}
    b_by = {r["index"]: r for r in b_records}
    if set(a_by) != set(b_by):
        raise UserError(f"--compare: {a_name} and {b_name} scored different samples "
                        f"({len(a_by)} vs {len(b_by)})", hint="evaluate both on the same --data and --limit")
    pairs = [(a_by[i], b_by[i]) for i in sorted(a_by)]
    for a, b in pairs:
        if a.get("reference") != b.get("reference"):
            raise UserError(f"--compare: sample {a['index']} has different references in {a_name} and {b_name}",
                            hint="evaluate both on the same data file")
    return pairs


def compare_reports(a_path: str, b_path: str) -> dict:
    """{metric, n, a, b, difference, only_a, only_b, p_value, significant, test}."""
    (a, a_records), (b, b_records) = read_report(a_path), read_report(b_path)
    if a.get("metric") != b.get("metric"):
        raise UserError(f"--compare: {a_path} used metric {a.get('metric')}, {b_path} used {b.get('metric')}")
    pairs = _paired(a_records, b_records, a_path, b_path)
    if a["metric"] == "loss":
        pairs = [(x, y) for x, y in pairs if x.get("loss") is not None and y.get("loss") is not None]
        only_a = sum(x["loss"] < y["loss"] for x, y in pairs)  # A better
        only_b = sum(y["loss"] < x["loss"] for x, y in pairs)
        first, second, test = a.get("loss"), b.get("loss"), "sign test on per-sample loss"
    else:
        only_a = sum(x["correct"] and not y["correct"] for x, y in pairs)
        only_b = sum(y["correct"] and not x["correct"] for x, y in pairs)
        first, second, test = a.get("accuracy"), b.get("accuracy"), "McNemar exact test"
    p = exact_binomial_p(only_a, only_b)
    return {"metric": a["metric"], "n": len(pairs), "a": first, "b": second,
            "difference": None if first is None or second is None else second - first,
            "only_a": only_a, "only_b": only_b, "p_value": p, "significant": p < ALPHA, "test": test}


def format_comparison(result: dict, a_path: str, b_path: str) -> str:
    name = "loss" if result["metric"] == "loss" else "accuracy"
    better = "lower loss" if result["metric"] == "loss" else "right"
    verdict = "significant" if result["significant"] else "not significant"
    return (f"{result['metric']} on {result['n']} paired samples\n"
            f"  A {a_path}: {name} {result['a']:.4f}\n"
            f"  B {b_path}: {name} {result['b']:.4f}\n"
            f"  B - A: {result['difference']:+.4f}; only A {better}: {result['only_a']}, only B {better}: {result['only_b']}\n"
            f"  {result['test']}: p = {result['p_value']:.4g} ({verdict} at {ALPHA:g})")
