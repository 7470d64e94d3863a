"""Checks that run before torch or transformers is imported, so common mistakes fail in a second.

Owns the early, cheap checks of a config: every dataset path exists and its first record
parses, the template name is known, the model folder exists (for `train`, with a `config.json`
and weight files), and (for `train`) that evaluation settings make sense: `data.eval_split` without
`train.eval_every` would hold data out for nothing, and `train.eval_every` without eval data
would evaluate nothing; both are errors, while `data.eval_datasets` never evaluated is a
warning (nothing is withheld). A missing path's message says where the path was written
(the config file's line, or the command line) and which rule resolved it. The thorough checks
(weights loadable, remote code, tokenizer, every record) still happen where the data and
model are loaded.
"""

from __future__ import annotations

from pathlib import Path

from tuneforge.config import config_path_source
from tuneforge.errors import ConfigError, DataError, UserError

FILE_RULE = "paths in a config file are relative to the file"
CLI_RULE = "paths on the command line are relative to the working directory"


def _path_hint(cfg, key: str, fix: str) -> str:
    source = config_path_source(cfg, key)
    if source == "command line":
        return f"{key} was given on the command line; {CLI_RULE}"
    if source:
        return f"{key} is set at {source}; {FILE_RULE}; {fix}"
    return fix


def check_model_path(cfg, weights: bool = True) -> None:
    """model.path: a folder, with config.json and weight files when `weights` (not whether they
    load); without, as `check-data` and `tokenize` need only the tokenizer in it."""
    if not cfg.model.path:
        raise UserError("model.path is not set", hint="point model.path at a Hugging Face model folder")
    folder = Path(cfg.model.path)
    if not folder.is_dir():
        raise UserError(f"model folder not found: {folder}",
                        hint=_path_hint(cfg, "model.path", "models are never downloaded"))
    if not weights:
        return
    if not (folder / "config.json").is_file():
        raise UserError(f"{folder} has no config.json",
                        hint="model.path must be a Hugging Face model folder (save_pretrained)")
    if not any(folder.glob("*.safetensors")) and not any(folder.glob("*.bin")) and not any(folder.glob("*.pt")):
        raise UserError(f"{folder} has no weights (*.safetensors)", hint="save the model with save_pretrained")


def _check_dataset(cfg, key: str, entry) -> None:
    """The entry's path exists; every InternEvo .bin has its .bin.meta; the first record of each
    JSON file parses in the entry's format (a format parsed elsewhere: the record is an object)."""
    from tuneforge.data.records import PARSERS, data_files, iter_json_records

    path = Path(entry.path)
    if not path.exists():
        raise DataError(f"data file not found: {path}", hint=_path_hint(cfg, key, "check the path"))
    if entry.format == "internevo":
        from tuneforge.data.internevo import internevo_files, meta_path

        for file in internevo_files(path):
            if not meta_path(file).is_file():
                raise DataError(f"{file} has no {meta_path(file).name} beside it",
                                hint="format internevo needs the .bin.meta index InternEvo's tokenizer writes")
        return
    parse = PARSERS.get(entry.format)
    for file in data_files(path):
        for where, record in iter_json_records(file):
            if not isinstance(record, dict):
                raise DataError(f"expected a JSON object per record, got {type(record).__name__}", where=where)
            if parse is not None:
                parse(record, entry.columns, entry.system, where)
            break


def check_data_paths(cfg) -> None:
    """Every dataset (and eval dataset) path exists; the first record of each parses."""
    for name in ("datasets", "eval_datasets"):
        for index, entry in enumerate(getattr(cfg.data, name)):
            _check_dataset(cfg, f"data.{name}.{index}.path", entry)


def check_template_name(cfg) -> None:
    from tuneforge.data.templates import NAMED_TEMPLATES
    from tuneforge.errors import did_you_mean

    name = cfg.data.template
    if name == "tokenizer" or name in NAMED_TEMPLATES or all(e.format == "internevo" for e in cfg.data.datasets):
        return
    raise ConfigError(f"data.template: unknown template {name!r}",
                      hint=did_you_mean(name, ["tokenizer", *NAMED_TEMPLATES])
                      or f"choose tokenizer or one of {', '.join(NAMED_TEMPLATES)}")


def check_eval_settings(cfg, warn=print) -> None:
    """eval_split without eval_every, eval_every without eval data: errors; unused eval_datasets: a warning."""
    data, train = cfg.data, cfg.train
    if data.eval_split > 0 and not data.eval_datasets and not train.eval_every:
        raise ConfigError(f"data.eval_split is {data.eval_split:g} but train.eval_every is 0: {data.eval_split:.0%} of "
                          "the data would be held out of training and never evaluated",
                          hint="set train.eval_every: N to evaluate every N steps, or remove data.eval_split")
    if train.eval_every and not data.eval_datasets and data.eval_split <= 0:
        raise ConfigError(f"train.eval_every is {train.eval_every} but there is no eval data to evaluate",
                          hint="set data.eval_datasets or data.eval_split, or train.eval_every: 0")
    if data.eval_datasets and not train.eval_every:
        warn("warning: data.eval_datasets are never evaluated: train.eval_every is 0")


def check_before_loading(cfg, *, training: bool = False, warn=print) -> None:
    """All of the above (model weights and eval checks only when `training`); raises the first problem."""
    check_model_path(cfg, weights=training)
    if not cfg.data.datasets:
        raise UserError("data.datasets is empty", hint="add at least one {path, format} entry")
    check_template_name(cfg)
    check_data_paths(cfg)
    if training:
        check_eval_settings(cfg, warn)
