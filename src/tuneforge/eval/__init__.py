"""`tuneforge eval`: scoring a model (or a run, a checkpoint, an adapter) on a task.

Modules: `metrics` (answer extraction and correctness per metric), `stats` (Wilson interval,
paired exact tests), `items` (eval records as prompt + reference), `generation` (batched
greedy answers scored by a metric), `likelihood` (loss and perplexity on the references with
the training loss masks), `report` (the JSON summary and per-sample JSONL), `compare`
(`--compare A.json B.json`), `run` (the verb).
"""
