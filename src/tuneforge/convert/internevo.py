"""InternEvo (`.py` with `data`, `model`, `parallel`, `adam`, ... dicts) configs as tuneforge keys.

InternEvo trains on its tokenized `.bin`/`.meta` folders (`data.train_folder`), packed into
micro-batches of `micro_bsz` sequences of `seq_len` tokens (samples cut at the boundary), with
`micro_num` micro-batches per optimizer step on each data-parallel rank; the data-parallel
size is world / (tensor size x pipeline size). The architecture keys (`model.hidden_size`, ...)
describe weights that tuneforge reads from an HF folder instead (convert the checkpoint first).
"""

from __future__ import annotations

from tuneforge.convert.common import add_batch_summary, finish_draft, launch_line, local_path, torch_dtype
from tuneforge.convert.draft import Draft, Source
from tuneforge.errors import UserError

ARCHITECTURE = "the architecture comes from model.path's config.json (an HF folder)"
REASONS = [
    ("JOB_NAME", "the run is named by train.work_dir"), ("model_type", ARCHITECTURE),
    ("model.*", ARCHITECTURE), ("VOCAB_SIZE", ARCHITECTURE), ("HIDDEN_SIZE", ARCHITECTURE),
    ("NUM_*", ARCHITECTURE), ("MLP_RATIO", ARCHITECTURE),
    ("ckpt.load_ckpt_info*", "training starts from model.path; a tuneforge run continues with --resume"),
    ("ckpt.auto_resume", "`tuneforge train CFG --resume` continues the latest complete checkpoint"),
    ("ckpt.*", "checkpoints are written to train.work_dir/checkpoints atomically (no upload)"),
    ("*_CKPT_FOLDER", "checkpoints are written to train.work_dir/checkpoints"),
    ("MODEL_ONLY_FOLDER", "the weights to start from are model.path"),
    ("data.valid_micro_num", "evaluation uses train.micro_batch_size rows per forward"),
    ("data.pack_sample_into_one", "packed rows keep sample boundaries (varlen attention, positions restart)"),
    ("data.skip_batches", "--resume continues exactly where the checkpoint stopped"),
    ("data.rampup_batch_size", "the global batch is constant"),
    ("data.empty_cache_and_diag_interval", "not needed"), ("data.diag_outlier_ratio", "a slow rank is named in "
                                                                                      "the progress line"),
    ("data.type", "the data format is internevo (tokenized .bin/.meta)"),
    ("grad_scaler*", "float16 uses torch's dynamic GradScaler; bfloat16 needs none"),
    ("hybrid_zero_optimizer.*", "ZeRO comes from parallel.strategy/zero"),
    ("loss.label_smoothing", "plain cross-entropy (no label smoothing)"),
    ("loss.*", "token-exact cross-entropy over all loss tokens of the step"),
    ("adam.adam_beta*", "tuneforge's AdamW uses betas (0.9, 0.999) and eps 1e-8 (no key)"),
    ("adam.adam_eps", "tuneforge's AdamW uses eps 1e-8"),
    ("beta2_scheduler*", "beta2 is constant"),
    ("lr_scheduler.init_steps", "the schedule starts at step 0 (--resume restores it)"),
    ("lr_scheduler.last_epoch", "the schedule starts at step 0 (--resume restores it)"),
    ("use_fp32_norm", "norms compute in model.dtype under autocast"),
    ("parallel.pipeline.*", "no pipeline parallel: FSDP shards the model over the data-parallel ranks instead"),
    ("parallel.weight.*", "weights are sharded by FSDP ZeRO-3 (parallel.zero) instead"),
    ("cudnn_*", "torch defaults"), ("monitor*", "progress and metrics.jsonl; no alerting"),
    ("DO_ALERT", "no alerting"),
]


def convert_internevo(src: Source, gpus: int, deepspeed: str | None, out_name: str) -> Draft:
    draft = Draft(source_name=src.config.path, kind="InternEvo")
    notes: list[str] = []

    # ---- parallel layout first: it decides the data-parallel size
    tp, pp, wp = _size(src, "tensor", 1), _size(src, "pipeline", 1), _size(src, "weight", 1)
    zero1 = _size(src, "zero1", -1)
    mode = src.get("parallel.tensor.mode", default="mtp") if isinstance(src.get("parallel.tensor"), dict) else "mtp"
    fsdp = bool(src.get("parallel.zero1.fsdp", default=False))
    if gpus % (tp * pp):
        raise UserError(f"--gpus {gpus} is not a multiple of tensor size x pipeline size = {tp} x {pp}",
                        hint="give the number of GPUs the InternEvo job ran on with --gpus N")
    sp_ours, tp_ours = (tp, 1) if mode == "isp" else (1, tp)

    # ---- model
    path_value = src.get("ckpt.load_ckpt_info.path", "MODEL_ONLY_FOLDER", default="")
    ckpt_type = src.get("ckpt.load_ckpt_info.ckpt_type", default="internevo")
    path, note = local_path(path_value or "", "model")
    draft.set("model", "path", path, note or "ckpt.load_ckpt_info.path")
    if ckpt_type not in ("hf", "hf_llama", "hf_model"):
        notes.append(f"ckpt_type={ckpt_type}: tuneforge reads Hugging Face folders (InternLM2's own layout "
                     "included); convert InternEvo's checkpoint to one and point model.path at it")
    dtype = torch_dtype(src.get("model.dtype", default="torch.bfloat16")) or "bfloat16"
    draft.set("model", "dtype", dtype, "model.dtype")
    flash = src.get("model.use_flash_attn", default=True)
    draft.set("model", "attn_implementation", "varlen", f"use_flash_attn={flash}: per-document attention on packed rows"
              " (flash-attn when installed)")
    checkpoint = src.get("model.checkpoint", default=False)
    draft.set("model", "gradient_checkpointing", bool(checkpoint),
              "model.checkpoint" + (f"={checkpoint}: a fraction of layers is not supported, all layers are"
                                    if isinstance(checkpoint, float) and 0 < checkpoint < 1 else ""))

    # ---- data
    seq_len = src.number("data.seq_len", "SEQ_LEN", default=2048)
    micro_bsz = src.number("data.micro_bsz", default=1)
    micro_num = src.number("data.micro_num", default=1)
    min_length = src.number("data.min_length", default=0)
    folders = [("datasets", src.get("data.train_folder", "TRAIN_FOLDER", default=None), "data.train_folder"),
               ("eval_datasets", src.get("data.valid_folder", "VALID_FOLDER", default=None), "data.valid_folder")]
    for key, folder, what in folders:
        if folder is None:
            if key == "datasets":
                notes.append("data.train_folder is None (InternEvo then trains on random tokens): "
                             "set data.datasets[0].path to your tokenized folder")
                entry_path, note = "data/train_folder", None
            else:
                continue
        else:
            entry_path, note = local_path(folder, what)
        if note:
            notes.append(note)
        entry = {"path": entry_path, "format": "internevo"}
        if min_length:
            entry["min_length"] = min_length
        draft.set("data", key, [entry], f"{what} (tokenized .bin/.meta)" + (", min_length" if min_length else ""))
    draft.set("data", "max_length", seq_len, "data.seq_len")
    packed = src.get("data.use_packed_dataset", default=True)
    draft.set("data", "packing", "hard" if packed else "none",
              "use_packed_dataset: concatenate and cut at seq_len like InternEvo" if packed
              else "use_packed_dataset=False: one sample per row")
    draft.set("data", "seed", 1024, "InternEvo's fixed packing seed")

    # ---- train: one row = one of InternEvo's seq_len sequences
    dp_theirs = gpus // (tp * pp)
    rows = micro_num * micro_bsz * dp_theirs
    dp_ours = gpus // (sp_ours * tp_ours)
    accumulation = micro_num
    if rows % (micro_bsz * dp_ours) == 0:
        accumulation = rows // (micro_bsz * dp_ours)
    draft.set("train", "micro_batch_size", micro_bsz, "data.micro_bsz (sequences of seq_len per micro-batch)")
    draft.set("train", "gradient_accumulation", accumulation, "data.micro_num" + (
        f", scaled because pipeline stages ({pp}) become data-parallel ranks here" if accumulation != micro_num else ""))
    total_steps = src.number("data.total_steps", "lr_scheduler.total_steps", default=0)
    if total_steps:
        draft.set("train", "max_steps", total_steps, "data.total_steps")
    draft.set("train", "lr", src.number("adam.lr", default=1e-4, cast=float), "adam.lr")
    draft.set("train", "weight_decay", src.number("adam.weight_decay", default=0.0, cast=float), "adam.weight_decay")
    draft.set("train", "warmup_ratio", src.number("lr_scheduler.warmup_ratio", default=0.0, cast=float), "lr_scheduler.warmup_ratio")
    draft.set("train", "lr_scheduler", "cosine", "InternEvo's FineTuneCosineAnnealingWarmupLR")
    eta_min = src.get("lr_scheduler.eta_min", default=None)
    if isinstance(eta_min, (int, float)) and draft.values["train"]["lr"]:
        draft.set("train", "min_lr_ratio", round(float(eta_min) / draft.values["train"]["lr"], 6), "eta_min / lr")
    draft.set("train", "max_grad_norm", src.number("hybrid_zero_optimizer.clip_grad_norm", default=1.0, cast=float),
              "hybrid_zero_optimizer.clip_grad_norm")
    save = src.number("ckpt.checkpoint_every", "CHECKPOINT_EVERY", default=0)
    enabled = src.get("ckpt.enable_save_ckpt", default=True)
    draft.set("train", "save_every", max(save, 0) if enabled else 0,
              "ckpt.checkpoint_every" if enabled else "ckpt.enable_save_ckpt=False: only final/ is written")
    valid = src.number("data.valid_every", default=0)
    draft.set("train", "eval_every", valid, "data.valid_every")
    if valid and "eval_datasets" not in draft.values["data"]:
        notes.append("data.valid_every is set but data.valid_folder is None: no evaluation runs until "
                     "data.eval_datasets or data.eval_split is set")
    draft.set("train", "work_dir", f"runs/{src.get('JOB_NAME', default='internevo')}", "JOB_NAME")

    # ---- parallel
    if deepspeed:
        notes.append(f"--deepspeed {deepspeed} ignored: InternEvo's ZeRO settings are converted to FSDP")
    if mode in ("msp", "fsp") and tp > 1:
        notes.append(f"tensor mode {mode}: tuneforge's tensor parallel does not also shard activations by sequence")
    if pp > 1:
        notes.append(f"pipeline size {pp}: no pipeline parallel here; FSDP shards the model over the extra ranks")
    zero = 3 if (fsdp or wp > 1 or pp > 1) else (2 if zero1 != 1 else 1)
    strategy = "fsdp" if zero > 1 else ("fsdp" if sp_ours * tp_ours > 1 else "ddp")
    zero = max(zero, 2) if strategy == "fsdp" else zero
    draft.set("parallel", "strategy", strategy, {3: "zero1.fsdp / weight or pipeline parallel: parameters sharded",
                                                  2: "zero1 size != 1: optimizer state sharded (FSDP zero 2 also "
                                                     "shards gradients; --deepspeed zero1 is exactly ZeRO-1 without TP/SP)",
                                                  1: "zero1 size 1: nothing sharded"}[zero])
    draft.set("parallel", "zero", zero)
    if sp_ours > 1:
        draft.set("parallel", "sequence_parallel", sp_ours, "tensor size with mode isp (sequence parallel, Ulysses)")
    if tp_ours > 1:
        draft.set("parallel", "tensor_parallel", tp_ours, f"tensor size (mode {mode})")

    add_batch_summary(draft, gpus, f"micro_num x micro_bsz x dp, dp = world/(tensor x pipeline) = "
                      f"{micro_num} x {micro_bsz} x {gpus}/({tp} x {pp})", rows, seq_len,
                      micro_bsz, accumulation, sp_ours, tp_ours)
    draft.header += [f"Launch: {launch_line(out_name, gpus, None)}"]
    return finish_draft(draft, src, notes, REASONS)


def _size(src: Source, key: str, default: int) -> int:
    """`parallel.<key>` written as an int or as dict(size=...)."""
    value = src.get(f"parallel.{key}", default=default)
    if isinstance(value, dict):
        value = src.get(f"parallel.{key}.size", default=default)
    return int(value) if isinstance(value, (int, float)) else default
