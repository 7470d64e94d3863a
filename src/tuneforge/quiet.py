"""Keeping library chatter (transformers' progress bars, deprecation warnings) out of our output."""

from __future__ import annotations


def quiet_libraries() -> None:
    import warnings

    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*gradient checkpointing.*")
