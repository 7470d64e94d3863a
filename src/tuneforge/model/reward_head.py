"""A reward model made from a causal LM: its decoder with a scalar head in place of the LM head.

Owns `as_reward_model`: the transformers `XForSequenceClassification` (num_labels 1) of the
causal LM's architecture, holding the very same decoder object (no weight is copied, so it
works on the meta device of FSDP ranks > 0 and on a 4-bit QLoRA decoder) and a new bias-free
`score = Linear(hidden, 1)`, initialised as transformers initialises it (normal with std
`initializer_range`, from the seeded torch RNG). Saved with `save_pretrained`, the folder loads
with `AutoModelForSequenceClassification` and scores a conversation at its last token: its
config.json names the class, `num_labels: 1` and the pad token that pooling skips.
`is_reward_model` tells such a model (or a PEFT model around one) apart from a causal LM, and
`classifier_class_name` / `auto_model_class` a saved one's config.
"""

from __future__ import annotations

import torch
from torch import nn

from tuneforge.errors import UserError

# set on a model by transformers' quantized loading; PEFT reads them to prepare a QLoRA model
_QUANTIZATION_ATTRIBUTES = ("hf_quantizer", "is_quantized", "quantization_method", "is_loaded_in_4bit",
                            "is_loaded_in_8bit")
_CLASSIFIER_SUFFIX = "ForSequenceClassification"  # transformers' naming of every such class


def classifier_class_name(architectures) -> str | None:
    """The first sequence-classification class among a config's `architectures`, if any."""
    return next((name for name in architectures or [] if name.endswith(_CLASSIFIER_SUFFIX)), None)


def auto_model_class(config):
    """transformers' Auto class that builds a saved model's config: sequence classification for a
    reward model (its `architectures` say so), else causal LM (checkpoint consolidation)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    if classifier_class_name(getattr(config, "architectures", None)):
        return AutoModelForSequenceClassification
    return AutoModelForCausalLM


def is_reward_model(model: nn.Module) -> bool:
    """True for a sequence-classification model (plain or PEFT-wrapped)."""
    base = model.get_base_model() if hasattr(model, "peft_config") and hasattr(model, "get_base_model") else model
    return type(base).__name__.endswith(_CLASSIFIER_SUFFIX)


def as_reward_model(model: nn.Module, pad_token_id: int | None) -> nn.Module:
    """The causal LM `model` as a one-label sequence classifier sharing its decoder (see module doc)."""
    from transformers import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING

    config = model.config
    cls = MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING.get(type(config), None)
    if cls is None:
        raise UserError(f"train.objective reward: {type(model).__name__} has no sequence-classification form "
                        "in transformers, which the reward model needs", hint="use a Llama, Qwen2/3 or Mistral model")
    config.num_labels = 1
    config.pad_token_id = pad_token_id
    config.architectures = [cls.__name__]  # what a checkpoint's model/config.json tells consolidation
    decoder = getattr(model, model.base_model_prefix)
    with torch.device("meta"):
        reward = cls(config)  # its own decoder stays on meta and is replaced at once
    setattr(reward, reward.base_model_prefix, decoder)
    embedding = decoder.get_input_embeddings().weight
    score = nn.Linear(config.hidden_size, 1, bias=False, device=embedding.device, dtype=embedding.dtype)
    if embedding.device.type != "meta":
        with torch.no_grad():
            score.weight.normal_(mean=0.0, std=getattr(config, "initializer_range", 0.02))
    reward.score = score
    for name in _QUANTIZATION_ATTRIBUTES:
        if hasattr(model, name):
            setattr(reward, name, getattr(model, name))
    return reward
