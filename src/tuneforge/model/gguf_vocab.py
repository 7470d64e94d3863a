"""The tokenizer half of a GGUF file: vocabulary, merges or scores, special ids, chat template.

Owns: `add_vocab`, which writes llama.cpp's `tokenizer.*` keys for a Hugging Face tokenizer:
- byte-level BPE (`tokenizer.json`, e.g. SmolLM2, Llama 3, Qwen): model `gpt2`, the tokens, their
  types (normal / control / user-defined / unused), the merges, and `tokenizer.ggml.pre`, the
  pre-tokenizer llama.cpp must apply. That name is found as llama.cpp's converter finds it (the
  SHA-256 of the token ids of a fixed probe text, for the tokenizers of the families tuneforge
  trains) or, for a vocabulary of its own, from the `pre_tokenizer` in `tokenizer.json`;
- SentencePiece-style BPE (byte fallback, e.g. Llama 2, Mistral v0.1, InternLM2): model `llama`,
  the pieces with their types and scores (from a `tokenizer.model` beside it when there is one,
  else from the merge order of `tokenizer.json`), and whether a dummy prefix space is added;
then bos/eos/unk/pad ids, whether encoding adds bos/eos, and the chat template. Anything else is
refused with one line, because llama.cpp would split text differently from training.
"""

from __future__ import annotations

import json
import re
from hashlib import sha256
from pathlib import Path

from tuneforge.errors import UserError

# The probe text of llama.cpp's `get_vocab_base_pre` (convert_hf_to_gguf.py): its token ids' hash
# names the pre-tokenizer. Only the families tuneforge trains are listed (hashes from that file).
PROBE_TEXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ "
    "🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ "
    "------======= нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you sure? "
    "'M not sure I'll make it, 'D you like some tea? We'Ve a'lL"
)
KNOWN_PRE_HASHES = {
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # Llama 3
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",  # SmolLM, SmolLM2
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",  # Qwen1.5 / 2 / 2.5
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",  # Qwen3
    "b3f499bb4255f8ca19fccd664443283318f2fd2414d5e0b040fbdd0cc195d6c5": "deepseek-r1-qwen",
    "63b97e4253352e6f357cc59ea5b583e3a680eaeaf2632188c2b952de2588485e": "tekken",  # Mistral Nemo
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
}
# Split patterns of `tokenizer.json` pre-tokenizers and the llama.cpp name of the same split.
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
SPLIT_NAMES = {LLAMA3_SPLIT: "llama-bpe", QWEN2_SPLIT: "qwen2"}


def _looks_special(token: str) -> bool:
    """Added tokens that are control tokens even when not flagged special (as llama.cpp decides)."""
    return token.startswith("<|") and token.endswith("|>")


def pre_tokenizer_name(tokenizer, tokenizer_json: dict) -> str:
    """llama.cpp's name for how this byte-level BPE tokenizer splits text before merging."""
    name = KNOWN_PRE_HASHES.get(sha256(str(tokenizer.encode(PROBE_TEXT)).encode()).hexdigest())
    if name is not None:
        return name
    pre = tokenizer_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [step.get("type") for step in steps]
    byte_level_with_regex = steps[-1].get("type") == "ByteLevel" and steps[-1].get("use_regex", True)
    if tokenizer_json.get("normalizer") is None and byte_level_with_regex:
        if kinds == ["ByteLevel"]:
            return "gpt-2"
        if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits"):
            return "smollm"
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        name = SPLIT_NAMES.get(steps[0].get("pattern", {}).get("Regex"))
        if name is not None:
            return name
    raise UserError(f"the tokenizer's pre-tokenizer ({'+'.join(map(str, kinds))}) is not one llama.cpp knows",
                    hint="GGUF export supports the tokenizers of Llama 3, SmolLM2, Qwen2/3, Mistral and GPT-2-style BPE")


def _bpe_vocab(writer, tokenizer, tokenizer_json: dict, n_vocab: int) -> None:
    import gguf

    vocab = tokenizer.get_vocab()
    by_id = {index: token for token, index in vocab.items()}
    added = {entry.content: entry for entry in tokenizer.added_tokens_decoder.values()}
    tokens, types = [], []
    for index in range(n_vocab):
        token = by_id.get(index)
        if token is None:
            tokens.append(f"[PAD{index}]")
            types.append(gguf.TokenType.UNUSED)
        elif token in added:
            tokens.append(token)
            special = added[token].special or _looks_special(token)
            types.append(gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(token)
            types.append(gguf.TokenType.NORMAL)
    merges = tokenizer_json["model"].get("merges") or []
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_tokenizer_name(tokenizer, tokenizer_json))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])


def _merge_scores(tokenizer_json: dict) -> dict[str, float]:
    """SentencePiece-style scores from BPE merges: a token made by an earlier merge scores higher."""
    scores: dict[str, float] = {}
    for rank, merge in enumerate(tokenizer_json.get("model", {}).get("merges") or []):
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        scores.setdefault(left + right, -float(rank))
    return scores


def _sentencepiece_vocab(writer, tokenizer, tokenizer_json: dict, model_file: Path, n_vocab: int) -> None:
    """A SentencePiece-style vocabulary; scores from `tokenizer.model` when present, else from the merges."""
    import gguf

    if model_file.is_file():
        from sentencepiece import SentencePieceProcessor

        processor = SentencePieceProcessor()
        processor.LoadFromFile(str(model_file))
        piece_scores = {processor.IdToPiece(i): processor.GetScore(i) for i in range(processor.vocab_size())}
    else:
        piece_scores = _merge_scores(tokenizer_json)
    by_id = {index: token for token, index in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    tokens, scores, types = [], [], []
    for index in range(n_vocab):
        token = by_id.get(index)
        tokens.append(token if token is not None else f"[PAD{index}]")
        scores.append(piece_scores.get(token, 0.0) if token is not None else -1000.0)
        if token is None:
            types.append(gguf.TokenType.UNUSED)
        elif index == tokenizer.unk_token_id:
            types.append(gguf.TokenType.UNKNOWN)
        elif index in added:
            special = added[index].special or _looks_special(token)
            types.append(gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)
        elif re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", token):
            types.append(gguf.TokenType.BYTE)
        else:
            types.append(gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_add_space_prefix(_space_prefix(tokenizer))


def _space_prefix(tokenizer) -> bool:
    """llama.cpp's `add_space_prefix`: put "▁" before the text and after every special token.

    True only when the tokenizer does both ("a" -> "▁a" and "</s>a" -> "</s>", "▁a", SentencePiece's
    own behaviour). A tokenizer that prefixes only the start of the whole text (transformers'
    Metaspace "first" scheme) gets False: chat prompts, which begin with a special token, then
    tokenize exactly as in training, and only plain text loses its leading "▁".
    """
    def pieces(text):
        return tokenizer.convert_ids_to_tokens(tokenizer(text, add_special_tokens=False)["input_ids"])

    special = tokenizer.eos_token or tokenizer.bos_token
    after_special = special is None or pieces(special + "a")[1].startswith("\u2581")
    return pieces("a")[0].startswith("\u2581") and after_special


def _special_ids(writer, tokenizer) -> None:
    for kind in ("bos", "eos", "unk", "pad"):
        token_id = getattr(tokenizer, f"{kind}_token_id", None)
        if token_id is not None:
            getattr(writer, f"add_{kind}_token_id")(token_id)
    ids = tokenizer("a")["input_ids"]  # does encoding add bos / eos? llama.cpp must do the same
    writer.add_add_bos_token(tokenizer.bos_token_id is not None and ids[0] == tokenizer.bos_token_id)
    writer.add_add_eos_token(tokenizer.eos_token_id is not None and ids[-1] == tokenizer.eos_token_id)


def add_vocab(writer, tokenizer, tokenizer_dir: Path, n_vocab: int, chat_template: str | None) -> None:
    """Write the `tokenizer.*` keys for `tokenizer` (loaded from `tokenizer_dir`) over `n_vocab` ids."""
    tokenizer_file = tokenizer_dir / "tokenizer.json"
    tokenizer_json = json.loads(tokenizer_file.read_text()) if tokenizer_file.is_file() else {}
    model = tokenizer_json.get("model", {})
    if len(tokenizer) > n_vocab:
        raise UserError(f"the tokenizer in {tokenizer_dir} has {len(tokenizer)} tokens but the model only "
                        f"{n_vocab} embedding rows", hint="resize the embeddings before exporting")
    if model.get("type") == "BPE" and not model.get("byte_fallback", False):
        _bpe_vocab(writer, tokenizer, tokenizer_json, n_vocab)
    elif model.get("type") == "BPE" or (tokenizer_dir / "tokenizer.model").is_file():
        _sentencepiece_vocab(writer, tokenizer, tokenizer_json, tokenizer_dir / "tokenizer.model", n_vocab)
    else:
        raise UserError(f"cannot write the tokenizer in {tokenizer_dir} to GGUF",
                        hint="supported: byte-level BPE (tokenizer.json) or SentencePiece (tokenizer.model)")
    _special_ids(writer, tokenizer)
    if chat_template:
        writer.add_chat_template(chat_template)
