"""Checks of a run's inputs that need no training: made before `--force` clears an old run.

`check_run_inputs` validates what can be validated without loading the model: the cheap
checks of `tuneforge.preflight` (model folder with config.json and weights, every dataset's
files and the first record of each, template name, eval settings), then the model folder's
remote-code rules, its tokenizer, and the chat template against that tokenizer. Any failure
is the same one-line `UserError` training would have raised later, but raised while the old
run is still intact.
"""

from __future__ import annotations


def check_run_inputs(cfg) -> None:
    """Raise the first problem with `cfg`'s model, tokenizer, template or data files."""
    from tuneforge.data.templates import get_template
    from tuneforge.model.load import check_model_folder, load_tokenizer
    from tuneforge.preflight import check_before_loading

    check_before_loading(cfg, training=True, warn=lambda line: None)  # train itself warns later
    check_model_folder(cfg.model)
    tokenizer = load_tokenizer(cfg.model.path, cfg.model.trust_remote_code)
    get_template(cfg.data.template, tokenizer)
