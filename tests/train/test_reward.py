"""The reward objective: packed Bradley-Terry training against a plain PyTorch reference, and
`final/` as a model `AutoModelForSequenceClassification` loads and scores with.

The reference is transformers' own `LlamaForSequenceClassification` built from the same causal-LM
folder (its own attention, its own last-non-pad-token pooling), run on each sequence alone,
with the loss -log sigmoid(r_chosen - r_rejected) written out in torch."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from helpers import train_then_sigkill
from pref_helpers import metric_rows, pair_records, pref_config, weights
from tuneforge.cli import main
from tuneforge.config import ModelConfig, PreferenceConfig
from tuneforge.data.collate import collate_rows
from tuneforge.data.preference import encode_pairs
from tuneforge.data.records import Message, Sample
from tuneforge.data.templates import get_template
from tuneforge.model.attention import VARLEN, register_varlen_attention
from tuneforge.train.reward import RewardLoss, sequence_rewards

LORA = {"r": 4, "alpha": 8, "dropout": 0.0}


def _samples(record):
    prompt = [Message("user", record["prompt"][0]["content"], loss=False)]
    return (Sample(messages=prompt + [Message("assistant", record["chosen"][0]["content"])]),
            Sample(messages=prompt + [Message("assistant", record["rejected"][0]["content"])]))


def _reference_model(model_dir, tokenizer, score):
    from transformers import AutoModelForSequenceClassification

    ref = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1, dtype=torch.float32,
                                                             pad_token_id=tokenizer.pad_token_id,
                                                             attn_implementation="eager")
    with torch.no_grad():
        ref.score.weight.copy_(score)
    return ref


@pytest.mark.parametrize("center", [0.0, 0.25])
def test_packed_loss_rewards_and_gradients_equal_plain_bradley_terry(tiny_model_dir, tokenizer, center):
    from tuneforge.model.load import load_model
    from tuneforge.model.reward_head import as_reward_model

    register_varlen_attention()
    torch.manual_seed(0)
    model = load_model(ModelConfig(path=str(tiny_model_dir), dtype="float32"), attn_implementation=VARLEN, dtype="float32")
    model = as_reward_model(model, tokenizer.pad_token_id)
    enc = encode_pairs([_samples(r) for r in pair_records(6, seed=7, max_words=8)], get_template("chatml", tokenizer),
                       tokenizer, 256, "right")
    seqs = [enc.tokens[a:b] for a, b in zip(enc.offsets[:-1], enc.offsets[1:])]
    pieces = [(enc.tokens[a:b], enc.trained[a:b], ("pairs", i // 2))
              for i, (a, b) in enumerate(zip(enc.offsets[:-1], enc.offsets[1:]))]
    batch = collate_rows([pieces[:4], pieces[4:10], pieces[10:]], tokenizer.pad_token_id)  # padded rows of whole pairs
    objective = RewardLoss(model, PreferenceConfig(center_rewards=center))
    loss = objective(batch)
    loss.backward()
    with torch.no_grad():
        rewards = sequence_rewards(model, batch, tokenizer.pad_token_id)

    ref = _reference_model(tiny_model_dir, tokenizer, model.score.weight)
    ref_rewards = torch.stack([ref(input_ids=torch.as_tensor(ids, dtype=torch.long)[None]).logits[0, 0] for ids in seqs])
    chosen, rejected = ref_rewards[0::2], ref_rewards[1::2]
    ref_loss = (-F.logsigmoid(chosen - rejected) + center * (chosen + rejected) ** 2).sum()
    ref_loss.backward()

    assert torch.allclose(rewards, ref_rewards.detach(), atol=1e-5)
    assert float(loss) == pytest.approx(float(ref_loss), abs=1e-5)
    ref_params = dict(ref.named_parameters())
    for name, param in model.named_parameters():
        other = ref_params[name].grad
        assert torch.allclose(param.grad, other, atol=1e-5, rtol=1e-4), name
    metrics = objective.take_metrics(_Local())
    assert metrics["rewards/accuracies"] == pytest.approx(float((chosen > rejected).double().mean()))
    assert metrics["rewards/margins"] == pytest.approx(float((chosen - rejected).mean()), abs=1e-6)
    assert "logps/chosen" not in metrics


class _Local:
    device = torch.device("cpu")

    @staticmethod
    def all_reduce_sum(x):
        return x


def test_pooling_skips_a_trailing_pad_token(tiny_model_dir, tokenizer):
    """Where the conversation ends in the pad token, the reward is read where transformers pools."""
    from tuneforge.train.reward import sequence_ends

    pad = tokenizer.pad_token_id
    a, b = np.array([5, 6, 7, pad]), np.array([8, 9, 10, 11, 12])
    trained_a, trained_b = np.array([0, 1, 1, 1], bool), np.array([0, 0, 1, 1, 1], bool)
    batch = collate_rows([[(a, trained_a, 0), (b, trained_b, 0)]], pad, length=12)
    assert sequence_ends(batch, pad).tolist() == [2, 8]
    assert sequence_ends(batch, None).tolist() == [3, 8]


def test_lora_reward_run_final_loads_with_auto_model_for_sequence_classification(tmp_path, tiny_model_dir, tokenizer):
    """LoRA reward model through the CLI: the loss falls, metrics and eval carry reward accuracy,
    final/ is one merged folder with a trained score head that scores a conversation alone and
    in a padded batch alike."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    cfg = pref_config(tmp_path, tiny_model_dir, "rm", "reward", n_pairs=24,
                      train={"micro_batch_size": 4, "max_steps": 6, "lr": 1e-2, "eval_every": 3},
                      data={"max_length": 80, "eval_split": 0.25}, model={"lora": {"r": 8, "alpha": 16, "dropout": 0.0}})
    assert main(["train", str(cfg)]) == 0
    rows = metric_rows(tmp_path / "rm")
    assert rows[0]["loss"] > rows[-1]["loss"] and {"rewards/accuracies", "rewards/margins"} <= rows[-1].keys()
    assert "logps/chosen" not in rows[-1]
    evals = metric_rows(tmp_path / "rm", "eval_loss")
    assert len(evals) == 2 and all(0.0 <= r["eval_rewards/accuracies"] <= 1.0 for r in evals)
    final = tmp_path / "rm" / "final"
    assert not (final / "adapter_config.json").exists() and not (tmp_path / "rm" / ".final-adapter").exists()
    config = json.loads((final / "config.json").read_text())
    assert config["architectures"] == ["LlamaForSequenceClassification"] and len(config["id2label"]) == 1
    loaded = AutoModelForSequenceClassification.from_pretrained(final, dtype=torch.float32)
    ckpt = weights(final)
    assert "score.weight" in ckpt and float(ckpt["score.weight"].norm()) > 0
    conversation = [{"role": "user", "content": "two plus three"}, {"role": "assistant", "content": "is five"}]
    final_tokenizer = AutoTokenizer.from_pretrained(final)
    ids = final_tokenizer.apply_chat_template(conversation, tokenize=True, return_tensors="pt", return_dict=True)
    score_final = loaded(**ids).logits[0, 0]
    assert torch.isfinite(score_final)
    batch_scores = loaded(**final_tokenizer.apply_chat_template(
        [conversation, conversation[:1] + [{"role": "assistant", "content": "is seven friends"}]], tokenize=True,
        return_tensors="pt", return_dict=True, padding=True)).logits[:, 0]
    assert float(batch_scores[0]) == pytest.approx(float(score_final), abs=1e-5)  # padding does not move the score
    assert main(["chat", str(final), "--prompt", "hi"]) != 0  # a reward model is not loaded as a causal LM


def test_merged_reward_adapter_scores_as_the_adapter_did(tmp_path, tiny_model_dir, tokenizer):
    """merge_adapter on a reward model's adapter (LoRA + score head, PEFT task SEQ_CLS) gives a folder
    whose AutoModelForSequenceClassification scores equal the unmerged PEFT model's."""
    from transformers import AutoModelForSequenceClassification

    from tuneforge.config import LoraConfig
    from tuneforge.model.export import merge_adapter
    from tuneforge.model.load import load_model
    from tuneforge.model.lora import apply_lora
    from tuneforge.model.reward_head import as_reward_model

    torch.manual_seed(1)
    model = as_reward_model(load_model(ModelConfig(path=str(tiny_model_dir), dtype="float32")), tokenizer.pad_token_id)
    model = apply_lora(model, LoraConfig(r=4, alpha=8, dropout=0.0))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad:  # LoRA B is 0 at start; the score is trained too
                param.add_(torch.randn_like(param) * 0.2)
    model.save_pretrained(tmp_path / "adapter")
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["task_type"] == "SEQ_CLS"
    merge_adapter(tiny_model_dir, tmp_path / "adapter", tmp_path / "merged")
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    ids = torch.tensor([[5, 9, 12, 40, 41, 7], [6, 8, 30, 31, 50, 2]])
    with torch.no_grad():
        assert torch.allclose(merged(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-5)


def test_reward_resume_after_sigkill_is_bit_exact(tmp_path, tiny_model_dir):
    """The score head (full weights, or saved with the LoRA adapter) resumes with everything else."""
    for lora in (True, False):
        sections = dict(train={"micro_batch_size": 2, "max_steps": 6, "save_every": 2, "keep_last": 1},
                        data={"max_length": 80}, model={"lora": LORA} if lora else {})
        whole, crash = f"whole{lora}", f"crash{lora}"
        assert main(["train", str(pref_config(tmp_path, tiny_model_dir, whole, "reward", **json.loads(json.dumps(sections))))]) == 0
        cfg = pref_config(tmp_path, tiny_model_dir, crash, "reward", **sections)
        train_then_sigkill(cfg, tmp_path / crash / "metrics.jsonl", rows=3)
        assert main(["train", str(cfg), "--resume"]) == 0
        keys = ("step", "loss", "grad_norm", "rewards/chosen", "rewards/margins")
        assert [[r[k] for k in keys] for r in metric_rows(tmp_path / crash)] == \
            [[r[k] for k in keys] for r in metric_rows(tmp_path / whole)]
        want = weights(tmp_path / whole / "final")
        assert "score.weight" in want
        for key, value in weights(tmp_path / crash / "final").items():
            assert torch.equal(value, want[key]), key


def test_final_scores_equal_the_trained_reward(tmp_path, tiny_model_dir, tokenizer):
    """Full fine-tuning: final/'s AutoModelForSequenceClassification score of each training
    sequence equals tuneforge's packed reward of it with the final weights."""
    from transformers import AutoModelForSequenceClassification

    from tuneforge.config import load_config
    from tuneforge.data.dataset import build_data

    cfg_path = pref_config(tmp_path, tiny_model_dir, "full", "reward", n_pairs=12,
                           train={"micro_batch_size": 2, "max_steps": 3, "lr": 1e-3}, data={"max_length": 80})
    assert main(["train", str(cfg_path)]) == 0
    final = tmp_path / "full" / "final"
    loaded = AutoModelForSequenceClassification.from_pretrained(final, dtype=torch.float32)
    register_varlen_attention()
    cfg = load_config(cfg_path)
    data = build_data(cfg, tokenizer)
    batch = collate_rows([data.row(i) for i in range(min(3, len(data)))], tokenizer.pad_token_id)
    with torch.no_grad():
        packed = sequence_rewards(loaded, batch, tokenizer.pad_token_id)  # the loaded model's own attention, packed
        ids, labels, cu = batch["input_ids"].reshape(-1), batch["labels"].reshape(-1), batch["cu_seqlens"].tolist()
        alone = [loaded(input_ids=ids[start:end][None]).logits[0, 0]  # each sequence (not the row padding) alone
                 for start, end in zip(cu[:-1], cu[1:]) if (labels[start:end] != -100).any()]
    assert torch.allclose(packed, torch.stack(alone), atol=1e-5)


def test_reward_refuses_generation_settings(tmp_path, tiny_model_dir, capsys):
    cfg = pref_config(tmp_path, tiny_model_dir, "gen", "reward", n_pairs=8,
                      train={"eval_prompts": ["hi"]}, data={"max_length": 80})
    assert main(["train", str(cfg)]) != 0
    assert "train.eval_prompts generates text" in capsys.readouterr().err
