"""Preference losses against TRL on the same model and pairs (fp32, CPU).

tuneforge packs the pairs into rows and runs varlen attention; TRL pads each sequence and runs
the model's own attention. DPO (sigmoid, hinge, ipo, RPO's SFT term) goes through a real
`DPOTrainer.compute_loss` (reference = the LoRA adapter disabled, as ours); ORPO and SimPO
through TRL's `ORPOTrainer.odds_ratio_loss` / `CPOTrainer.cpo_loss` on log-probs from TRL's
`get_batch_logps`; conservative DPO (label smoothing) through `cpo_loss`'s sigmoid form on the
log-ratios. Per-pair losses and rewards agree within 1e-5, gradients within 1e-4 (relative).
Answers are kept short: DPO's rewards are differences of fp32 sums of log-probs, whose rounding
alone (TRL's, ours) reaches 1e-5 on sums of a few hundred.
"""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

pytest.importorskip("trl")

from pref_helpers import pair_records  # noqa: E402
from tuneforge.config import ModelConfig, PreferenceConfig  # noqa: E402
from tuneforge.data.collate import collate_rows  # noqa: E402
from tuneforge.data.preference import encode_pairs  # noqa: E402
from tuneforge.data.records import Message, Sample  # noqa: E402
from tuneforge.data.templates import get_template  # noqa: E402
from tuneforge.model.attention import VARLEN, register_varlen_attention  # noqa: E402
from tuneforge.train import preference as pref  # noqa: E402

N_PAIRS = 4


def _samples(record):
    prompt = [Message("user", record["prompt"][0]["content"], loss=False)]
    return (Sample(messages=prompt + [Message("assistant", record["chosen"][0]["content"])]),
            Sample(messages=prompt + [Message("assistant", record["rejected"][0]["content"])]))


@pytest.fixture(scope="module")
def setup(tiny_model_dir, tokenizer):
    from tuneforge.model.load import load_model
    from tuneforge.config import LoraConfig
    from tuneforge.model.lora import apply_lora

    register_varlen_attention()
    model = load_model(ModelConfig(path=str(tiny_model_dir), dtype="float32"), device=torch.device("cpu"),
                       attn_implementation=VARLEN, dtype="float32")
    model = apply_lora(model, LoraConfig(r=4, alpha=8, dropout=0.0))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # an adapter that changes the model: policy != reference
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    enc = encode_pairs([_samples(r) for r in pair_records(N_PAIRS, seed=5, max_words=4)], get_template("chatml", tokenizer),
                       tokenizer, 256, "right")
    assert enc.counts["pairs"] == N_PAIRS
    seqs = [(enc.tokens[a:b], enc.trained[a:b]) for a, b in zip(enc.offsets[:-1], enc.offsets[1:])]
    pieces = [(ids, trained, ("pairs", i // 2)) for i, (ids, trained) in enumerate(seqs)]
    packed = collate_rows([pieces[:4], pieces[4:]], tokenizer.pad_token_id)  # two rows of two pairs each
    return SimpleNamespace(model=model, seqs=seqs, packed=packed, tokenizer=tokenizer)


def _trl_examples(seqs):
    """TRL's tokenized form: prompt ids, then each answer's ids up to its last trained token."""
    out = []
    for (c, cm), (r, rm) in zip(seqs[0::2], seqs[1::2]):
        start = int(np.flatnonzero(cm)[0])
        assert start == int(np.flatnonzero(rm)[0]) and np.array_equal(c[:start], r[:start])
        out.append({"prompt_ids": c[:start].tolist(), "chosen_ids": c[start: np.flatnonzero(cm)[-1] + 1].tolist(),
                    "rejected_ids": r[start: np.flatnonzero(rm)[-1] + 1].tolist()})
    return out


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _ours(s, objective, **settings):
    loss_module = pref.PreferenceLoss(s.model, 5, objective, PreferenceConfig(**settings))  # chunk 5: several chunks
    s.model.zero_grad()
    loss = loss_module(s.packed) / N_PAIRS
    loss.backward()
    return loss.detach(), _grads(s.model)


def _per_pair(s, objective, **settings):
    """Per-pair losses and rewards from our packed per-sequence log-probs."""
    st = PreferenceConfig(**settings)
    with torch.no_grad():
        logps, counts = pref.sequence_logps(s.model, s.packed, 5)
        pc, pr, nc, nr = logps[0::2], logps[1::2], counts[0::2], counts[1::2]
        if objective == "dpo":
            with s.model.disable_adapter():
                ref = pref.sequence_logps(s.model, s.packed, 5)[0]
            return pref.dpo_losses(pc, pr, ref[0::2], ref[1::2], nc, nr, beta=st.beta, loss_type=st.loss_type,
                                   label_smoothing=st.label_smoothing, rpo_alpha=st.rpo_alpha)
        if objective == "orpo":
            return pref.orpo_losses(pc / nc, pr / nr, beta=st.beta)
        return pref.simpo_losses(pc / nc, pr / nr, beta=st.beta, gamma=st.gamma, label_smoothing=st.label_smoothing)


@pytest.fixture(scope="module")
def dpo_trainer(setup, tmp_path_factory):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    args = DPOConfig(output_dir=str(tmp_path_factory.mktemp("trl")), report_to=[], use_cpu=True, beta=0.1)
    dataset = Dataset.from_list([{"prompt": "two", "chosen": "three", "rejected": "four"}])  # unused: we hand it batches
    # TRL copies an existing adapter as its reference ("ref"): build it while the adapter is still zero,
    # so that its reference is the base model, as ours (the adapter disabled)
    adapter = {n: p.detach().clone() for n, p in setup.model.named_parameters() if "lora_B" in n}
    with torch.no_grad():
        for n, p in setup.model.named_parameters():
            if n in adapter:
                p.zero_()
    trainer = DPOTrainer(model=setup.model, args=args, train_dataset=dataset, processing_class=setup.tokenizer)
    with torch.no_grad():
        for n, p in setup.model.named_parameters():
            if n in adapter:
                p.copy_(adapter[n])
    return trainer


def _trl_dpo(trainer, s, examples, loss_types, weights, beta):
    trainer.loss_types, trainer.loss_weights, trainer.beta = loss_types, weights, beta
    base = s.model.get_base_model()
    base.set_attn_implementation("sdpa")  # TRL pads; varlen takes packed rows only
    try:
        trainer._metrics["train"].clear()
        s.model.zero_grad()
        loss = trainer.compute_loss(s.model, trainer.data_collator(examples))
        loss.backward()
    finally:
        base.set_attn_implementation(VARLEN)
    return loss.detach(), _grads(s.model), {k: v[-1] for k, v in trainer._metrics["train"].items()}


def _close_grads(got, want, rel=1e-4):
    assert got.keys() == want.keys()
    for key in want:
        err = float((got[key] - want[key]).norm() / want[key].norm().clamp_min(1e-12))
        assert err <= rel, (key, err)


@pytest.mark.parametrize("loss_type,rpo_alpha", [("sigmoid", 0.0), ("hinge", 0.0), ("ipo", 0.0), ("sigmoid", 0.5)])
def test_dpo_matches_trl_dpo_trainer(setup, dpo_trainer, loss_type, rpo_alpha):
    settings = dict(beta=0.5, loss_type=loss_type, rpo_alpha=rpo_alpha)
    types, weights = ([loss_type, "sft"], [1.0, rpo_alpha]) if rpo_alpha else ([loss_type], [1.0])
    examples = _trl_examples(setup.seqs)
    losses, chosen, rejected = _per_pair(setup, "dpo", **settings)
    assert float((chosen - rejected).abs().max()) > 0.05  # the adapter moved the policy off the reference
    for i, example in enumerate(examples):  # per pair: loss and both rewards
        loss, _, logged = _trl_dpo(dpo_trainer, setup, [example], types, weights, 0.5)
        assert float(losses[i]) == pytest.approx(float(loss), abs=1e-5)
        assert float(chosen[i]) == pytest.approx(logged["rewards/chosen"], abs=1e-5)
        assert float(rejected[i]) == pytest.approx(logged["rewards/rejected"], abs=1e-5)
    ours, ours_grads = _ours(setup, "dpo", **settings)
    if not rpo_alpha:  # TRL's SFT term is a token mean over the batch, ours a mean over pairs: same for one pair only
        loss, grads, _ = _trl_dpo(dpo_trainer, setup, examples, types, weights, 0.5)
        assert float(ours) == pytest.approx(float(loss), abs=1e-5)
        _close_grads(ours_grads, grads)


def _trl_sequence_logps(s):
    """Each sequence alone, unpadded, through the model's own attention; TRL's get_batch_logps (mean per token)."""
    from trl.experimental.orpo import ORPOTrainer

    base = s.model.get_base_model()
    base.set_attn_implementation("sdpa")
    try:
        out = []
        for ids, trained in s.seqs:
            ids = torch.as_tensor(ids, dtype=torch.long)[None]
            labels = torch.where(torch.as_tensor(trained)[None], ids, torch.full_like(ids, -100))
            out.append(ORPOTrainer.get_batch_logps(s.model(input_ids=ids).logits, labels, average_log_prob=True))
    finally:
        base.set_attn_implementation(VARLEN)
    out = torch.cat(out)
    return out[0::2], out[1::2]


def _stub(**kw):
    return SimpleNamespace(accelerator=SimpleNamespace(device=torch.device("cpu")), alpha=0.0, **kw)


def test_orpo_and_simpo_match_trl(setup):
    from trl.experimental.cpo import CPOTrainer
    from trl.experimental.orpo import ORPOTrainer

    cases = {
        "orpo": (dict(beta=0.3), lambda c, r: ORPOTrainer.odds_ratio_loss(_stub(beta=0.3), c, r)[:3], True),
        "simpo": (dict(beta=2.0, gamma=0.7, label_smoothing=0.1),
                  lambda c, r: CPOTrainer.cpo_loss(_stub(beta=2.0, loss_type="simpo", simpo_gamma=0.7, label_smoothing=0.1), c, r),
                  False),
    }
    for objective, (settings, trl_loss, with_nll) in cases.items():
        setup.model.zero_grad()
        c, r = _trl_sequence_logps(setup)
        terms, want_chosen, want_rejected = trl_loss(c, r)
        want = (-c - terms) if with_nll else terms  # ORPO: NLL of the chosen answer minus beta * log sigmoid(log odds)
        want.mean().backward()
        want_grads = _grads(setup.model)
        losses, chosen, rejected = _per_pair(setup, objective, **settings)
        torch.testing.assert_close(losses, want.detach(), atol=1e-5, rtol=0)
        torch.testing.assert_close(chosen, want_chosen, atol=1e-5, rtol=0)
        torch.testing.assert_close(rejected, want_rejected, atol=1e-5, rtol=0)
        loss, grads = _ours(setup, objective, **settings)
        assert float(loss) == pytest.approx(float(want.mean()), abs=1e-5)
        _close_grads(grads, want_grads)


def test_label_smoothing_is_conservative_dpo(setup):
    from trl.experimental.cpo import CPOTrainer

    with torch.no_grad():
        logps = pref.sequence_logps(setup.model, setup.packed, 5)[0]
        with setup.model.disable_adapter():
            ref = pref.sequence_logps(setup.model, setup.packed, 5)[0]
    ratios = logps - ref
    losses = _per_pair(setup, "dpo", beta=0.5, label_smoothing=0.2)[0]
    # CPO's sigmoid loss on (chosen, rejected) "log-probs" is cDPO's on the log-ratios
    want = CPOTrainer.cpo_loss(_stub(beta=0.5, loss_type="sigmoid", label_smoothing=0.2), ratios[0::2], ratios[1::2])[0]
    torch.testing.assert_close(losses, want, atol=1e-6, rtol=0)
