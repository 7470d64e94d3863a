"""Chat templates: the named ones equal each model family's official Jinja template, and
the tokens and trained positions we produce equal `apply_chat_template` and the assistant spans."""

import numpy as np
import pytest

from tuneforge.data.records import Message, Sample
from tuneforge.data.templates import NAMED_TEMPLATES, TokenizerTemplate, get_template
from tuneforge.data.tokenize import encode_samples
from tuneforge.errors import ConfigError

# The official templates of each family, as shipped in their tokenizer_config.json files.
OFFICIAL = {
    "chatml": "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}",
    "internlm2_chat": "{{ bos_token }}{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}",
    "llama3_chat": "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}",
    "llama2_chat": "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}{% for message in loop_messages %}{% if loop.index0 == 0 and system_message != false %}{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}{% else %}{% set content = message['content'] %}{% endif %}{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}",
    "mistral": "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}{% endif %}{% endfor %}",
}

CONVERSATIONS = [
    [Message("user", "What is 2+3?"), Message("assistant", "It is 5.")],
    [Message("system", "You are terse."), Message("user", " Add 2 and 3 "), Message("assistant", "5 "),
     Message("user", "And 4+4?"), Message("assistant", "8")],
]


def as_rows(messages):
    return [{"role": m.role, "content": m.content} for m in messages]


@pytest.mark.parametrize("name", sorted(OFFICIAL))
@pytest.mark.parametrize("conv", range(len(CONVERSATIONS)))
def test_named_template_equals_official(tokenizer, name, conv):
    messages = CONVERSATIONS[conv]
    if name == "mistral" and messages[0].role == "system":
        messages = messages[1:]  # the v0.1 template has no system role
    ours = "".join(text for text, _ in NAMED_TEMPLATES[name].render(messages, tokenizer))
    official = tokenizer.apply_chat_template(as_rows(messages), chat_template=OFFICIAL[name], tokenize=False)
    assert ours == official
    ours_gen = "".join(t for t, _ in NAMED_TEMPLATES[name].render(messages[:-1], tokenizer, add_generation_prompt=True))
    official_gen = tokenizer.apply_chat_template(as_rows(messages[:-1]), chat_template=OFFICIAL[name], tokenize=False,
                                                 add_generation_prompt=True)
    if name not in ("llama2_chat", "mistral"):  # these two have no generation prompt
        assert ours_gen == official_gen


def expected_chatml_mask(ids, tokenizer):
    """Independently: trained = tokens after '<|im_start|>assistant\\n' up to and incl. <|im_end|>."""
    head = tokenizer.encode("<|im_start|>assistant\n", add_special_tokens=False)
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    mask = np.zeros(len(ids), dtype=bool)
    i = 0
    while i < len(ids):
        if ids[i: i + len(head)] == head:
            j = i + len(head)
            while ids[j] != end:
                mask[j] = True
                j += 1
            mask[j] = True
            i = j
        i += 1
    return mask


@pytest.mark.parametrize("template", ["tokenizer", "chatml"])
def test_ids_equal_apply_chat_template_and_mask_is_assistant_spans(tokenizer, template):
    samples = [Sample(messages=m) for m in CONVERSATIONS]
    enc = encode_samples(samples, get_template(template, tokenizer), tokenizer, max_length=512, truncation="right")
    for i, sample in enumerate(samples):
        ids = enc.tokens[enc.offsets[i]: enc.offsets[i + 1]].tolist()
        reference = tokenizer.apply_chat_template(as_rows(sample.messages), tokenize=True)["input_ids"]
        assert ids == reference
        trained = enc.trained[enc.offsets[i]: enc.offsets[i + 1]]
        assert trained.tolist() == expected_chatml_mask(ids, tokenizer).tolist()
        decoded = tokenizer.decode([t for t, m in zip(ids, trained) if m])
        assert decoded == "".join(m.content + "<|im_end|>" for m in sample.messages if m.role == "assistant")


def test_loss_flag_on_user_message_trains_its_content(tokenizer):
    messages = [Message("user", "train me", loss=True), Message("assistant", "ok", loss=False), Message("user", "q"),
                Message("assistant", "a")]
    for template in ("tokenizer", "chatml"):
        enc = encode_samples([Sample(messages=messages)], get_template(template, tokenizer), tokenizer, 512, "right")
        trained = tokenizer.decode(enc.tokens[enc.trained].tolist())
        assert trained == "train mea<|im_end|>", template  # user content; assistant content + end


def test_tokenizer_without_template_and_unknown_name(tokenizer):
    import copy

    bare = copy.deepcopy(tokenizer)
    bare.chat_template = None
    with pytest.raises(ConfigError, match="no chat template"):
        TokenizerTemplate(bare)
    with pytest.raises(ConfigError, match="unknown template 'chatlm'.*did you mean 'chatml'"):
        get_template("chatlm", tokenizer)


def test_template_needing_tokens_the_tokenizer_lacks(tokenizer):
    from transformers import AutoTokenizer  # noqa: F401 - documents the dependency
    import copy

    plain = copy.deepcopy(tokenizer)
    plain.chat_template = None
    # a tokenizer that splits <|im_start|> cannot use chatml
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate("<>|_abcdefghijklmnopqrstuvwxyz\n ")}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="_"))
    raw.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    fast = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="_")
    with pytest.raises(ConfigError, match="needs the special token <\\|im_start\\|>"):
        get_template("chatml", fast)
