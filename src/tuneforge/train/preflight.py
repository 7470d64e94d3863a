"""Checks of a run's inputs that need no training: made before `--force` clears an old run.

`check_run_inputs` validates what can be validated without loading the model: the model
folder (config.json, weights, remote-code rules), its tokenizer, the chat template against
that tokenizer, and every dataset entry (its files exist, and the first record of each
file parses in the entry's format; InternEvo `.bin` files have their `.bin.meta`). Any
failure is the same one-line `UserError` training would have raised later, but raised
while the old run is still intact.
"""

from __future__ import annotations

from tuneforge.errors import DataError


def check_run_inputs(cfg) -> None:
    """Raise the first problem with `cfg`'s model, tokenizer, template or data files."""
    from tuneforge.data.templates import get_template
    from tuneforge.model.load import check_model_folder, load_tokenizer

    check_model_folder(cfg.model)
    tokenizer = load_tokenizer(cfg.model.path)
    get_template(cfg.data.template, tokenizer)
    for entry in [*cfg.data.datasets, *cfg.data.eval_datasets]:
        check_first_records(entry)


def check_first_records(entry) -> None:
    """The files of one dataset entry exist and the first record of each parses."""
    if entry.format == "internevo":
        from tuneforge.data.internevo import internevo_files, meta_path

        for file in internevo_files(entry.path):
            if not meta_path(file).is_file():
                raise DataError(f"{file} has no {meta_path(file).name} beside it",
                                hint="format internevo reads .bin files with their .bin.meta index")
        return
    from tuneforge.data.records import PARSERS, data_files, iter_json_records

    parse = PARSERS.get(entry.format)  # a format read elsewhere: its files must exist and hold JSON
    for file in data_files(entry.path):
        for where, record in iter_json_records(file):
            if not isinstance(record, dict):
                raise DataError(f"expected a JSON object per record, got {type(record).__name__}", where=where)
            if parse is not None:
                parse(record, entry.columns, entry.system, where)
            break
