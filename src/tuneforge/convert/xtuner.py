"""XTuner (mmengine `.py`) configs as tuneforge keys.

Reads the settings where XTuner's runner reads them (`model.llm`, `train_dataset`,
`train_dataloader`, `optim_wrapper`, `param_scheduler`, `default_hooks`, `custom_hooks`),
falling back to the PART 1 names (`lr`, `batch_size`, ...) that XTuner's own configs bind.
XTuner chooses DeepSpeed on its command line (`--deepspeed deepspeed_zero2`), so that choice
comes from `convert-config --deepspeed`, and the launch line is written as a comment.
"""

from __future__ import annotations

from tuneforge.convert.common import add_batch_summary, finish_draft, launch_line, local_path, torch_dtype
from tuneforge.convert.draft import Draft, Source
from tuneforge.convert.pyconfig import Opaque

MAP_FN_FORMATS = {"alpaca_map_fn": "alpaca", "alpaca_zh_map_fn": "alpaca", "openai_map_fn": "openai",
                  "pretrain_map_fn": "text", "default_map_fn": "xtuner"}
TEMPLATES = {"internlm2_chat": "internlm2_chat", "llama3_chat": "llama3_chat", "llama2_chat": "llama2_chat",
             "qwen_chat": "qwen_chat", "mistral": "mistral", "mixtral": "mistral", "default": "default"}
SHARED_DATASET_KEYS = ("max_length", "pack_to_max_length", "use_varlen_attn", "template_map_fn.template")
FUSED_EXPERTS = ("w1", "w2", "w3")
WORKERS = "tuneforge tokenizes and packs before training (cached) and reads rows from memory: no loader workers"
TOKENIZER = "the tokenizer is read from model.path"
SCHEDULE = ("the schedule is linear warmup from lr/warmup_steps over train.warmup_ratio of the steps, then "
            "train.lr_scheduler (cosine) down to train.min_lr_ratio x lr")
HOOKS = "tuneforge logs loss, lr, tokens/s and eval results to metrics.jsonl itself (no hooks)"
REASONS = [
    ("tokenizer", TOKENIZER), ("tokenizer.*", TOKENIZER), ("*.tokenizer", TOKENIZER),
    ("SYSTEM", "eval_prompts are generated without a system prompt"),
    ("model.type", "supervised fine-tuning is what tuneforge trains (no model class to choose)"),
    ("model.llm.type", "the model loads with transformers' AutoModelForCausalLM from model.path"),
    ("model.llm.quantization_config.*", "tuneforge's 4-bit QLoRA is NF4 with double quantization, "
                                        "computing in model.dtype"),
    ("model.lora.bias", "LoRA trains no biases ('none')"), ("model.lora.task_type", "always CAUSAL_LM"),
    ("model.lora.type", "LoRA through PEFT"),
    ("*.type=process_hf_dataset", "tuneforge reads, tokenizes, caches and packs the files itself"),
    ("*.dataset.type", "files are read by tuneforge (.jsonl, .json or a folder)"),
    ("*.dataset.path", "'json': the files are data_files"),
    ("*.remove_unused_columns", "only the format's fields are read"),
    ("*.shuffle_before_pack", "packing always follows a seeded shuffle (data.seed)"),
    ("*.template_map_fn*", "the template is data.template"),
    ("*.type=ConcatDataset", "data.datasets lists every file (with a mixing weight each)"),
    ("train_dataloader.collate_fn*", "rows are collated with per-sample positions for varlen attention"),
    ("train_dataloader.sampler.shuffle", "data.sampler random shuffles each epoch (seeded by train.seed)"),
    ("train_dataloader.sampler.seed", "the sampler is seeded by train.seed"),
    ("train_dataloader.sampler.per_device_batch_size", "length_grouped sorts groups of micro_batch_size x "
                                                       "gradient_accumulation rows per rank"),
    ("train_dataloader.sampler.*", "data.sampler chooses random, length_grouped or sequential"),
    ("train_dataloader.num_workers", WORKERS), ("dataloader_num_workers", WORKERS),
    ("train_dataloader.batch_sampler", "rows per step are train.micro_batch_size x train.gradient_accumulation"),
    ("sampler", "data.sampler"), ("optim_type", "torch AdamW over the trainable parameters"),
    ("optim_wrapper.type", "mixed precision follows model.dtype (GPU autocast; the CPU trains in fp32)"),
    ("optim_wrapper.loss_scale", "float16 uses a dynamic loss scale; bfloat16 needs none"),
    ("optim_wrapper.dtype", "mixed precision follows model.dtype"),
    ("optim_wrapper.optimizer.type", "torch AdamW over the trainable parameters"),
    ("optim_wrapper.optimizer.betas", "tuneforge's AdamW uses betas (0.9, 0.999) and eps 1e-8 (no key)"),
    ("betas", "tuneforge's AdamW uses betas (0.9, 0.999) and eps 1e-8 (no key)"),
    ("optim_wrapper.clip_grad.error_if_nonfinite", "a non-finite loss stops the run (exit 3) unless train.skip_nonfinite"),
    ("param_scheduler*", SCHEDULE), ("train_cfg.type", "tuneforge's training loop"),
    ("custom_hooks*", HOOKS), ("default_hooks.timer", "step times are in metrics.jsonl"),
    ("default_hooks.param_scheduler", SCHEDULE), ("default_hooks.checkpoint.by_epoch", "checkpoints count steps"),
    ("default_hooks.logger.log_metric_by_epoch", "metrics are per step"),
    ("default_hooks.sampler_seed", "the sampler is reseeded every epoch from train.seed"),
    ("env_cfg", "the process-group backend follows the device (NCCL on GPUs, gloo on the CPU)"),
    ("visualizer", "metrics go to metrics.jsonl and TensorBoard (when installed)"),
    ("log_level", "warnings of libraries are quieted; --debug shows tracebacks"),
    ("load_from", "training starts from model.path; a tuneforge run continues with --resume"),
    ("resume", "`tuneforge train CFG --resume` continues the latest complete checkpoint"),
    ("randomness.deterministic", "CPU runs are bit-reproducible; GPU kernels follow torch's defaults"),
    ("log_processor", "metrics.jsonl holds every step (no smoothing window)"),
    ("default_hooks.checkpoint.type", "checkpoints: train.save_every and train.keep_last"),
    ("default_hooks.checkpoint.save_optimizer", "checkpoints always hold the optimizer state (exact --resume)"),
    ("default_hooks.checkpoint.save_last", "final/ is always written at the end"),
    ("train_dataloader.pin_memory", "batches are collated in the training process"),
    ("default_hooks.logger.type", "logging: train.log_every"),
    ("*.type", "a class chosen by name (dict(type=...)); tuneforge builds this part itself"),
]


def _dataset_entries(src: Source, ds: dict, base: str, notes: list[str], shared: dict) -> list[dict]:
    """tuneforge dataset entries for one XTuner `process_hf_dataset` dict."""
    if isinstance(ds.get("datasets"), list):  # ConcatDataset(datasets=[...])
        return [e for i, sub in enumerate(ds["datasets"]) if isinstance(sub, dict)
                for e in _dataset_entries(src, sub, f"{base}.datasets[{i}]", notes, shared)]
    for key in SHARED_DATASET_KEYS:  # one value for all datasets here: read from each, noted if they differ
        value = src.get(f"{base}.{key}", default=None)
        first = shared.setdefault(key, value)
        if value is not None and first is not None and value != first:
            notes.append(f"the datasets differ in {key} ({first} vs {value}): tuneforge uses one value for all")
    map_fn = src.get(f"{base}.dataset_map_fn", default=None)
    fmt = "xtuner"
    if isinstance(map_fn, Opaque):
        fmt = MAP_FN_FORMATS.get(map_fn.leaf, "xtuner")
        if map_fn.leaf not in MAP_FN_FORMATS:
            notes.append(f"dataset_map_fn={map_fn.leaf} has no tuneforge equivalent: write its output, XTuner's "
                         "{'conversation': [{'system', 'input', 'output'}]} records, and read them as format xtuner")
    elif map_fn is not None:
        notes.append(f"dataset_map_fn={map_fn} is not read; the format is assumed to be xtuner")
    files = src.get(f"{base}.dataset.data_files", "data_files", default=None)
    if files is None:
        files = src.get(f"{base}.dataset.path", "data_path", default=None)
    if isinstance(files, dict):  # data_files=dict(train=...)
        files = src.get(f"{base}.dataset.data_files.train", default=next(iter(files.values()), None))
    entries = []
    for item in files if isinstance(files, (list, tuple)) else [files]:
        if item is None:
            continue
        path, note = local_path(item, "data file")
        if note:
            notes.append(note)
        entries.append({"path": path, "format": fmt})
    return entries


def convert_xtuner(src: Source, gpus: int, deepspeed: str | None, out_name: str) -> Draft:
    draft = Draft(source_name=src.config.path, kind="XTuner")
    notes: list[str] = []
    llm = "model.llm"

    # ---- model
    model_path = src.get(f"{llm}.pretrained_model_name_or_path", "pretrained_model_name_or_path",
                         "tokenizer.pretrained_model_name_or_path", default="")
    path, note = local_path(model_path, "model")
    draft.set("model", "path", path, note or "pretrained_model_name_or_path")
    quant = src.get(f"{llm}.quantization_config", default=None)
    bits = None
    if isinstance(quant, dict):
        bits = 4 if src.get(f"{llm}.quantization_config.load_in_4bit") else \
            8 if src.get(f"{llm}.quantization_config.load_in_8bit") else None
    lora_key = "model.llm_lora" if src.has("model.llm_lora") else "model.lora"  # LLaVA: the LLM's adapter
    lora = src.get(lora_key, default=None)
    kind = src.get("model.type", default=None)
    if isinstance(kind, Opaque) and kind.leaf != "SupervisedFinetune":
        notes.append(f"model type {kind.leaf}: only its language-model settings are converted "
                     "(tuneforge fine-tunes causal LMs; no vision encoder or projector)")
    sp = src.number("sequence_parallel_size", default=1)
    strategy, zero, offload, ds_note = _strategy(deepspeed, bits, sp)
    dtype = torch_dtype(src.get(f"{llm}.torch_dtype", "optim_wrapper.dtype", default="bfloat16")) or "bfloat16"
    if dtype == "float16" and strategy in ("auto", "fsdp") and gpus > 1:
        draft.set("model", "dtype", "bfloat16", "float16 in the source: FSDP here trains in bfloat16 (no fp16 loss scaling)")
    else:
        draft.set("model", "dtype", dtype, "torch_dtype / optim_wrapper.dtype")
    varlen = bool(src.get("model.use_varlen_attn", "train_dataset.use_varlen_attn", "use_varlen_attn",
                          "train_dataloader.collate_fn.use_varlen_attn", default=False))
    draft.set("model", "attn_implementation", "varlen" if varlen else "auto",
              "use_varlen_attn=True" if varlen else
              "use_varlen_attn=False; tuneforge still never lets packed samples attend to each other")
    checkpointing = src.get("model.use_activation_checkpointing", default=True)
    draft.set("model", "gradient_checkpointing", bool(checkpointing), "model.use_activation_checkpointing"
              + ("" if src.has("model.use_activation_checkpointing") else " (XTuner's default: on)"))
    remote = src.get(f"{llm}.trust_remote_code", "tokenizer.trust_remote_code", default=False)
    draft.set("model", "trust_remote_code", False, f"trust_remote_code={remote} in the source; InternLM2 and "
              "Llama-family models load without remote code (set true only if yours needs it)" if remote else None)
    if isinstance(lora, dict):
        entry = {"r": src.number(f"{lora_key}.r", default=8),
                 "alpha": src.number(f"{lora_key}.lora_alpha", default=8, cast=float),
                 "dropout": src.number(f"{lora_key}.lora_dropout", default=0.0, cast=float)}
        targets = src.get(f"{lora_key}.target_modules", default=None)
        entry["target_modules"] = [t for t in targets if t not in FUSED_EXPERTS] \
            if isinstance(targets, (list, tuple)) else "all-linear"
        note = "model.lora (PEFT LoraConfig)" if targets else \
            "model.lora; XTuner adapts every linear layer when target_modules is unset"
        if isinstance(targets, (list, tuple)) and set(targets) & set(FUSED_EXPERTS):
            note += "; w1/w2/w3 dropped: Mixtral's experts are fused parameters in transformers 5, not Linear layers"
        draft.set("model", "lora", entry, note)
    if bits and not isinstance(lora, dict):
        notes.append("quantization_config without a LoRA adapter: left out (QLoRA needs model.lora)")
    elif bits:
        draft.set("model", "quantization", {"bits": bits}, "quantization_config (bitsandbytes; a CUDA GPU)")

    # ---- data
    shared: dict = {}
    datasets = _dataset_entries(src, src.get("train_dataset", "train_dataloader.dataset", default={}) or {},
                                "train_dataset" if src.has("train_dataset") else "train_dataloader.dataset", notes, shared)
    draft.set("data", "datasets", datasets, "train_dataset: data_files / path, dataset_map_fn -> format")
    template = _pick(src, shared, "template_map_fn.template", "prompt_template", None)
    name = TEMPLATES.get(template.leaf) if isinstance(template, Opaque) else None
    draft.set("data", "template", name or "tokenizer", f"prompt_template={template}" if name else
              f"prompt_template={template} has no named equivalent: the tokenizer's own chat template is used")
    max_length = _pick(src, shared, "max_length", "max_length", 2048)
    if isinstance(max_length, bool) or not isinstance(max_length, int):
        src.unevaluated.append(("max_length", max_length, 2048))
        max_length = 2048
    draft.set("data", "max_length", max_length, "max_length")
    pack = bool(_pick(src, shared, "pack_to_max_length", "pack_to_max_length", False))
    draft.set("data", "packing", "hard" if pack else "none",
              "pack_to_max_length=True: concatenate and cut at max_length like XTuner "
              "(packing: soft keeps samples whole)" if pack else "pack_to_max_length=False")
    sampler = src.get("train_dataloader.sampler.type", "sampler", default=None)
    sampler_name = sampler.leaf if isinstance(sampler, Opaque) else str(sampler)
    draft.set("data", "sampler", "length_grouped" if sampler_name == "LengthGroupedSampler" else "random",
              f"sampler={sampler_name}")

    # ---- train
    micro = src.number("train_dataloader.batch_size", "batch_size", default=1)
    accumulation = src.number("optim_wrapper.accumulative_counts", "accumulative_counts", default=1)
    draft.set("train", "micro_batch_size", micro, "batch_size (per device)")
    draft.set("train", "gradient_accumulation", accumulation, "accumulative_counts")
    draft.set("train", "epochs", src.number("train_cfg.max_epochs", "max_epochs", default=1), "max_epochs")
    iters = src.number("train_cfg.max_iters", default=0)
    if iters:
        draft.set("train", "max_steps", iters, "train_cfg.max_iters")
    lr = src.number("optim_wrapper.optimizer.lr", "lr", default=2e-5, cast=float)
    draft.set("train", "lr", lr, "lr")
    draft.set("train", "weight_decay", src.number("optim_wrapper.optimizer.weight_decay", "weight_decay", default=0, cast=float),
              "weight_decay")
    warmup = src.get("warmup_ratio", "warm_up_ratio", default=None)
    if warmup is not None:
        draft.set("train", "warmup_ratio", float(warmup), "warmup_ratio")
    schedulers = src.get("param_scheduler", default=[]) or []
    for i, sched in enumerate(schedulers if isinstance(schedulers, list) else [schedulers]):
        kind = sched.get("type") if isinstance(sched, dict) else None
        kind = kind.leaf if isinstance(kind, Opaque) else kind
        if kind == "CosineAnnealingLR":
            draft.set("train", "lr_scheduler", "cosine", "param_scheduler: CosineAnnealingLR")
            eta_min = src.get(f"param_scheduler[{i}].eta_min", default=0.0)
            if isinstance(eta_min, (int, float)) and lr:
                draft.set("train", "min_lr_ratio", round(float(eta_min) / lr, 6), "eta_min / lr")
    draft.set("train", "max_grad_norm", src.number("optim_wrapper.clip_grad.max_norm", "max_norm", default=0.0, cast=float),
              "max_norm (0 = no clipping)")
    seed = src.get("randomness.seed", default=None)
    if isinstance(seed, int):
        draft.set("train", "seed", seed, "randomness.seed")
    save = src.number("default_hooks.checkpoint.interval", "save_steps", default=0)
    draft.set("train", "save_every", max(save, 0), "save_steps" if save >= 0 else
              f"save_steps={save}: no periodic checkpoints, only final/")
    keep = src.number("default_hooks.checkpoint.max_keep_ckpts", "save_total_limit", default=2)
    draft.set("train", "keep_last", keep if keep > 0 else 1_000_000,
              "save_total_limit" if keep and keep > 0 else "save_total_limit=-1 (unlimited)")
    prompts, freq = _evaluation(src)
    if prompts:
        draft.set("train", "eval_prompts", prompts, "evaluation_inputs")
        draft.set("train", "eval_every", freq, "evaluation_freq")
        notes.append("eval_prompts are generated at each evaluation, which needs eval data: set data.eval_split "
                     "(e.g. 0.01) or data.eval_datasets")
    interval = src.get("default_hooks.logger.interval", default=None)
    if isinstance(interval, int) and interval > 0:
        draft.set("train", "log_every", interval, "default_hooks.logger.interval")
    draft.set("train", "work_dir", f"runs/{src.config.path.rsplit('/', 1)[-1].removesuffix('.py')}",
              "XTuner's work_dirs/ (or --work-dir)")

    # ---- parallel
    draft.set("parallel", "strategy", strategy, ds_note)
    if zero is not None:
        draft.set("parallel", "zero", zero)
    if offload:
        draft.set("parallel", "offload", True)
    if sp > 1:
        draft.set("parallel", "sequence_parallel", sp, "sequence_parallel_size (Ulysses)")

    rows = micro * accumulation * (gpus // sp)
    add_batch_summary(draft, gpus, f"batch_size x accumulative_counts x world/sequence_parallel_size = "
                      f"{micro} x {accumulation} x {gpus}/{sp}", rows, max_length, micro, accumulation, sp, 1)
    ds_flag = deepspeed if strategy == "deepspeed" else None
    draft.header += [f"Launch: {launch_line(out_name, gpus, ds_flag)}",
                     f"  (XTuner: NPROC_PER_NODE={gpus} xtuner train {src.config.path.rsplit('/', 1)[-1]}"
                     f"{' --deepspeed deepspeed_' + deepspeed if deepspeed and not deepspeed.endswith('.json') else ''})"]
    return finish_draft(draft, src, notes, REASONS)


def _pick(src: Source, shared: dict, key: str, name: str, default):
    """A dataset setting as the datasets wrote it, else the PART 1 name, else `default`."""
    value = shared.get(key)
    return value if value is not None else src.get(name, default=default)


def _evaluation(src: Source) -> tuple[list[str], int]:
    hooks = src.get("custom_hooks", default=[]) or []
    for i, hook in enumerate(hooks if isinstance(hooks, list) else []):
        kind = hook.get("type") if isinstance(hook, dict) else None
        if isinstance(kind, Opaque) and kind.leaf == "EvaluateChatHook":
            prompts = src.get(f"custom_hooks[{i}].evaluation_inputs", "evaluation_inputs", default=[])
            freq = src.number(f"custom_hooks[{i}].every_n_iters", "evaluation_freq", default=0)
            return [str(p) for p in prompts or []], freq
    prompts = src.get("evaluation_inputs", default=[])
    return [str(p) for p in prompts or []], src.number("evaluation_freq", default=0)


def _strategy(deepspeed: str | None, bits: int | None, sp: int):
    """(parallel.strategy, zero, offload, note) for XTuner's --deepspeed choice."""
    if deepspeed and sp > 1:
        return "fsdp", 3, False, (f"--deepspeed {deepspeed} with sequence_parallel_size {sp}: tuneforge runs "
                                  "Ulysses under FSDP2 only, so FSDP ZeRO-3 here")
    if deepspeed and deepspeed.endswith(".json"):
        return "deepspeed", None, False, f"--deepspeed {deepspeed} (pass the same file to tuneforge train)"
    if deepspeed:
        stage = int(deepspeed[4])
        if bits and stage == 3:
            return "deepspeed", 2, "offload" in deepspeed, "QLoRA cannot be partitioned by ZeRO-3 here: ZeRO-2"
        return "deepspeed", stage, "offload" in deepspeed, f"XTuner --deepspeed deepspeed_{deepspeed}"
    if bits:
        return "ddp", None, False, ("no --deepspeed given; QLoRA is not sharded by FSDP here, so DDP "
                                    "(or convert with --deepspeed zero2)")
    return "auto", None, False, ("no --deepspeed given (XTuner picks it on its command line): FSDP2 over "
                                 "several ranks; convert with --deepspeed zero2|zero3 for DeepSpeed")
