"""The run configuration: pydantic schema, YAML loading, dotted overrides, clear errors.

A config is a YAML file shaped like `Config` below. Unknown keys and wrong types are
`ConfigError`s that name the file and line, the dotted key, what was expected and, where a
close name exists, a "did you mean" suggestion; a key written twice is an error at its second
line. Every path written in the file (train.work_dir too) is resolved relative to the file;
paths given as command-line overrides relative to the working dir.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, model_validator

from tuneforge.errors import ConfigError, did_you_mean


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, values are re-validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


class LoraConfig(Section):
    """LoRA adapters through PEFT; only the adapter weights train."""

    r: int = Field(16, gt=0, description="Rank of each adapter (the inner dimension of its two matrices).")
    alpha: float = Field(32, gt=0, description="Adapter scale numerator: the update is multiplied by alpha / r.")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the adapter input, from 0 (none) to below 1.")
    target_modules: Union[Literal["all-linear"], list[str]] = Field(
        "all-linear", description="Layers that get adapters: all-linear (every linear layer but the LM head) "
                                  "or a list of module names such as [q_proj, v_proj].")


class QuantizationConfig(Section):
    """QLoRA: the frozen base weights quantized by bitsandbytes (a CUDA GPU)."""

    bits: Literal[4, 8] = Field(4, description="4 (NF4 with double quantization, computing in model.dtype) or 8.")


class ModelConfig(Section):
    """The model to fine-tune and how it runs."""

    path: str = Field("", description="A Hugging Face model folder with safetensors weights "
                                      "(InternLM2 folders too); relative to the config file.")
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "bfloat16", description="float32 | bfloat16 | float16: GPU autocast precision (the CPU trains in fp32 unless "
                            "model.cpu_mixed_precision is set).")
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2", "varlen"] = Field(
        "auto", description="auto | varlen | sdpa | eager | flash_attention_2; auto and varlen run per-document "
                            "attention on packed rows (flash-attn when installed, else SDPA per document).")
    gradient_checkpointing: bool = Field(False, description="Recompute activations in backward to save memory.")
    compile: bool | Literal["auto"] = Field("auto", description=(
        "torch.compile each decoder block (a one-time compile; less memory, faster steps). auto (default): "
        "compile where it is measured to pay: SFT in one fp32 process on the CPU, no quantization or gradient "
        "checkpointing, a decoder of >= 50M matmul parameters, and torch.compile builds a small test kernel "
        "(a C++ compiler with Python's headers); elsewhere eager, with the reason logged."))
    cpu_mixed_precision: bool = Field(False, description=(
        "On the CPU, compute in model.dtype (bfloat16, or float16 with loss scaling) as on a GPU: autocast, "
        "FSDP2 bf16 parameters with fp32 reduction, DeepSpeed bf16/fp16; false (default) trains in fp32 on the "
        "CPU, which is much faster there."))
    trust_remote_code: bool = Field(False, description="Run the model folder's own Python code; off by default "
                                                       "because remote code runs arbitrary Python.")
    allow_pickle_weights: bool = Field(False, description="Also load pickled .bin weights; off by default "
                                                          "(only safetensors unless you trust the files).")
    lora: Optional[LoraConfig] = Field(None, description="null for full fine-tuning, or LoRA settings such as "
                                                          "{r: 16, alpha: 32, dropout: 0.05, target_modules: all-linear}.")
    adapter: Optional[str] = Field(None, description=(
        "A PEFT LoRA adapter folder (e.g. a run's final/) to start from: training continues its weights, with "
        "the rank, alpha, dropout and target modules saved in its adapter_config.json; null trains a new adapter "
        "(model.lora) or the full model."))
    quantization: Optional[QuantizationConfig] = Field(
        None, description="null, or {bits: 4} for QLoRA (needs model.lora and bitsandbytes; 4-bit runs on a CUDA GPU or the CPU, 8-bit on CUDA only).")


Format = Literal["alpaca", "openai", "sharegpt", "xtuner", "text", "internevo", "preference"]


class DatasetConfig(Section):
    """One data file or folder and how to read it."""

    path: str = Field(description="A .jsonl or .json file, or a folder of them (an internevo folder of .bin files); "
                                  "relative to the config file.")
    format: Format = Field("alpaca", description="alpaca | openai | sharegpt | xtuner | text | internevo "
                                                 "(see Data formats).")
    weight: float = Field(1.0, gt=0, description="Share of every epoch: 1 = each sample once, 0.5 a seeded half, "
                                                 "2.5 two copies and a random half.")
    columns: dict[str, str] = Field(default_factory=dict, description="Maps the format's field names to yours, "
                                                                      "e.g. {instruction: question, output: answer}.")
    system: Optional[str] = Field(None, description="A system prompt for samples that have none.")
    min_length: int = Field(0, ge=0, description="internevo format: samples with fewer tokens are dropped (and counted).")


class DataConfig(Section):
    """The training data: files, template, packing, order."""

    datasets: list[DatasetConfig] = Field(default_factory=list, description="One or more datasets, mixed by weight.")
    eval_datasets: list[DatasetConfig] = Field(default_factory=list, description="Held-out datasets evaluated "
                                                                                 "every train.eval_every steps.")
    eval_split: float = Field(0.0, ge=0, lt=1, description="Fraction of the training samples held out for "
                                                           "evaluation instead of eval_datasets (0 = none).")
    template: str = Field("tokenizer", description="tokenizer (its own Jinja chat template) | chatml | qwen_chat | "
                                                   "internlm2_chat | llama3_chat | llama2_chat | mistral | default.")
    max_length: int = Field(2048, ge=2, description="Tokens per row: samples longer are truncated or dropped, "
                                                    "packed rows hold up to this many.")
    packing: Literal["none", "soft", "hard"] = Field(
        "soft", description="none | soft (whole samples per row, best-fit decreasing) | hard (concatenate and "
                            "cut at max_length).")
    sampler: Literal["random", "length_grouped", "sequential"] = Field(
        "random", description="random | length_grouped (XTuner's LengthGroupedSampler) | sequential.")
    truncation: Literal["right", "drop"] = Field("right", description="right (cut a too-long sample at max_length) "
                                                                      "| drop (skip it, counted).")
    num_workers: int = Field(0, ge=0, description="Accepted for compatibility and unused: data is tokenized and "
                                                  "packed before training and rows are read from memory.")
    seed: int = Field(1024, description="Seed of the shuffle before packing and of dataset mixing.")
    pack_buffer: int = Field(8192, ge=1, description="Samples per best-fit-decreasing buffer (bounds packing memory).")
    cache_dir: Optional[str] = Field(None, description="Where tokenized and packed data is cached; null = "
                                                       "$TUNEFORGE_CACHE or ~/.cache/tuneforge/data.")


class PreferenceConfig(Section):
    """The preference objectives' settings (`train.objective` dpo | orpo | simpo | reward)."""

    beta: float = Field(0.1, gt=0, description="Temperature of the preference loss: DPO's KL weight, ORPO's "
                        "odds-ratio weight (lambda), SimPO's reward scale; rewards are beta x log-probs.")
    loss_type: Literal["sigmoid", "ipo", "hinge"] = Field(
        "sigmoid", description="DPO loss: sigmoid (DPO), ipo (IPO, on per-token mean log-ratios as TRL) or hinge (SLiC).")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="Conservative DPO / SimPO: the assumed probability "
                                   "that a pair's preference label is flipped (sigmoid losses only); 0 = off.")
    rpo_alpha: float = Field(0.0, ge=0, description="DPO only: weight of an SFT term on the chosen answer (RPO); "
                             "the term is the chosen answer's mean token NLL; 0 = off.")
    gamma: float = Field(0.5, ge=0, description="SimPO: the target reward margin (TRL's simpo_gamma).")
    center_rewards: float = Field(0.0, ge=0, description="reward only: weight of (r_chosen + r_rejected)^2 per pair, "
                                  "which keeps the rewards centred on 0 (TRL's center_rewards_coefficient); 0 = off.")
    reference: Literal["auto", "adapter", "cached"] = Field(
        "auto", description="DPO's reference model: adapter (LoRA with the adapter disabled), cached (log-probs of "
        "the initial model computed once before training and cached on disk) or auto (adapter with LoRA, else cached).")


class TrainConfig(Section):
    """The optimization: batch, schedule, checkpoints, evaluation, logging."""

    micro_batch_size: int = Field(1, gt=0, description="Rows per forward pass on each data-parallel rank.")
    gradient_accumulation: int = Field(1, gt=0, description="Micro-batches per optimizer step; the loss is averaged "
                                                            "over all loss tokens of the step.")
    epochs: int = Field(1, gt=0, description="Passes over the data (ignored when max_steps is set).")
    max_steps: Optional[int] = Field(None, gt=0, description="Optimizer steps to run; overrides epochs (null = "
                                                             "epochs decide).")
    lr: float = Field(2.0e-5, gt=0, description="Peak learning rate of AdamW.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay (never on biases and norms).")
    warmup_ratio: float = Field(0.03, ge=0, le=1, description="Fraction of the steps with a linear warmup to lr.")
    lr_scheduler: Literal["cosine", "linear", "constant"] = Field(
        "cosine", description="cosine | linear | constant: the decay after warmup.")
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="The schedule ends at min_lr_ratio x lr.")
    max_grad_norm: float = Field(1.0, ge=0, description="Clip the global gradient norm to this (0 = no clipping).")
    seed: int = Field(42, description="Seed of model initialisation (LoRA), dropout and the sampler.")
    save_every: int = Field(0, ge=0, description="Save a checkpoint every N steps (0 = only final/).")
    keep_last: int = Field(2, ge=1, description="Complete checkpoints kept; older ones are deleted.")
    eval_every: int = Field(0, ge=0, description="Evaluate every N steps when eval data exists (0 = never).")
    eval_prompts: list[str] = Field(default_factory=list, description="Prompts whose generations are logged at "
                                                                      "each evaluation.")
    eval_at_start: bool = Field(False, description=(
        "Evaluate once before the first step (logged as step 0), e.g. to score the starting model; needs "
        "data.eval_datasets or data.eval_split."))
    eval_metric: Optional[Literal["gsm8k", "exact", "regex", "contains"]] = Field(None, description=(
        "At each evaluation also generate greedy answers to the eval samples and log their accuracy as "
        "eval_accuracy: gsm8k (number after ####, else the last one), exact, regex (train.eval_metric_pattern) "
        "or contains; null = eval loss only."))
    eval_metric_samples: int = Field(64, gt=0, description=(
        "How many eval samples (the first ones, in file order) train.eval_metric generates answers for."))
    eval_max_new_tokens: int = Field(256, gt=0, description=(
        "Longest answer train.eval_metric generates, in tokens (generation also stops at the end-of-turn token)."))
    eval_metric_pattern: Optional[str] = Field(None, description=(
        "The regular expression of train.eval_metric: regex, with exactly one group: the answer."))
    work_dir: str = Field("runs/default", description="The run directory: config.yaml, metrics.jsonl, "
                                                      "checkpoints/, final/.")
    loss_chunk_size: int = Field(1024, gt=0, description="Loss tokens per chunk of the LM head + cross-entropy "
                                                         "(fused when the head is frozen); bounds logits memory.")
    cpu_heap_trim_every: int = Field(1, ge=0, description=(
        "CPU only: after every N-th decoder block of the forward pass, check whether to give freed heap memory "
        "back to the OS (glibc malloc_trim, see cpu_heap_trim_slack); 0 turns trimming off."))
    cpu_heap_trim_slack: float = Field(0.5, ge=0, description=(
        "CPU only: trim at a check only when the free but still resident heap exceeds this fraction of the "
        "memory in use (a float >= 0; lower holds the peak RSS lower at the cost of page faults, 0 trims at "
        "every check)."))
    skip_nonfinite: bool = Field(False, description="Skip (and count) steps with a NaN/inf loss instead of stopping.")
    log_every: int = Field(1, gt=0, description="Write a metrics.jsonl row every N steps.")
    objective: Literal["sft", "dpo", "orpo", "simpo", "reward"] = Field(
        "sft", description="What is trained: sft (next-token loss), dpo, orpo, simpo (preference pairs) or reward "
        "(a Bradley-Terry reward model: a scalar head on the last token of each sequence; final/ loads with "
        "AutoModelForSequenceClassification, LoRA merged in); every objective but sft needs datasets of format preference.")
    preference: PreferenceConfig = Field(default_factory=PreferenceConfig,
                                         description="Settings of the preference objectives (beta, loss type, ...).")


class ParallelConfig(Section):
    """How several processes share the work."""

    strategy: Literal["auto", "single", "ddp", "fsdp", "deepspeed"] = Field(
        "auto", description="auto | single | ddp | fsdp | deepspeed; auto = single for one process, FSDP2 for "
                            "several (DDP with zero: 1).")
    zero: Literal[1, 2, 3] = Field(3, description="FSDP: 3 = parameters, gradients and optimizer state sharded, "
                                                  "2 = parameters kept between forward and backward; DeepSpeed: "
                                                  "the ZeRO stage 1/2/3.")
    offload: bool = Field(False, description="Keep shards and the optimizer step on the CPU (FSDP, DeepSpeed).")
    sequence_parallel: int = Field(1, ge=1, description="Ulysses sequence-parallel group size (FSDP); must divide "
                                                        "the number of ranks with tensor_parallel.")
    tensor_parallel: int = Field(1, ge=1, description="Tensor-parallel group size (FSDP, Llama-family layers).")
    timeout_s: float = Field(1800.0, gt=0, description="A collective waiting longer fails, naming the rank that "
                                                       "stopped responding.")


class Config(Section):
    """A run: model, data, train and parallel sections."""

    _path_sources: dict = PrivateAttr(default_factory=dict)  # dotted path key -> "file:line" | "command line"
    model: ModelConfig = Field(default_factory=ModelConfig, description="The model to fine-tune and how it runs.")
    data: DataConfig = Field(default_factory=DataConfig, description="The training and evaluation data: files, "
                                                                     "template, packing, order.")
    train: TrainConfig = Field(default_factory=TrainConfig, description="The optimization: batch, schedule, "
                                                                        "checkpoints, evaluation, logging.")
    parallel: ParallelConfig = Field(default_factory=ParallelConfig, description="How several processes share "
                                                                                 "the work.")

    @model_validator(mode="after")
    def _consistent(self) -> "Config":
        if self.model.quantization is not None and self.model.lora is None and self.model.adapter is None:
            raise ValueError("model.quantization (QLoRA) needs model.lora (or model.adapter) to be set")
        if self.model.adapter is not None and self.model.lora is not None:
            raise ValueError("model.adapter continues an adapter with the LoRA settings saved in it; "
                             "remove model.lora (or model.adapter to train a new one)")
        train = self.train
        if (train.eval_at_start or train.eval_metric) and not (self.data.eval_datasets or self.data.eval_split > 0):
            key = "train.eval_at_start" if train.eval_at_start else "train.eval_metric"
            raise ValueError(f"{key} needs eval data: set data.eval_datasets or data.eval_split")
        if train.eval_metric == "regex":
            import re

            try:
                groups = re.compile(train.eval_metric_pattern or "").groups
            except re.error as exc:
                raise ValueError(f"train.eval_metric_pattern is not a valid regular expression: {exc}") from None
            if groups != 1:
                raise ValueError("train.eval_metric: regex needs train.eval_metric_pattern with exactly one group")
        pairs = [d.format == "preference" for d in self.data.datasets + self.data.eval_datasets]
        if self.train.objective == "sft" and any(pairs):
            raise ValueError("datasets of format preference need train.objective dpo, orpo, simpo or reward")
        if self.train.objective != "sft" and not all(pairs):
            raise ValueError(f"train.objective {self.train.objective} needs every dataset in format preference")
        if self.train.objective != "sft" and self.data.packing == "hard":
            raise ValueError("data.packing hard cuts sequences; preference pairs need packing soft or none")
        if self.train.objective == "reward" and self.model.adapter is not None:
            raise ValueError("train.objective reward trains a new scalar head and adapter; model.adapter continues a "
                             "language-model adapter: merge it first (tuneforge export RUN/final OUT --merge-lora) "
                             "and point model.path at OUT")
        if self.train.objective == "reward" and (train.eval_metric or train.eval_prompts):
            key = "train.eval_metric" if train.eval_metric else "train.eval_prompts"
            raise ValueError(f"{key} generates text, which a reward model cannot; its evaluation reports eval_loss "
                             "and eval_rewards/accuracies")
        if self.train.objective == "dpo" and self.train.preference.reference == "adapter" and self.model.lora is None:
            raise ValueError("train.preference.reference adapter needs model.lora (the reference is the model without it)")
        return self


# ----------------------------------------------------------------------------- loading

PATH_KEYS = ("model.path", "model.adapter", "data.cache_dir", "train.work_dir")
DATASET_LISTS = ("datasets", "eval_datasets")


def _line_index(text: str, filename: str) -> dict[tuple, int]:
    """Map each key path in a YAML document to its 1-based line number."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{filename}:{mark.line + 1}" if mark else filename
        raise ConfigError(f"not valid YAML: {getattr(exc, 'problem', exc)}", where=where) from None
    lines: dict[tuple, int] = {}

    def walk(node, path):
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                sub = path + (key.value,)
                if sub in lines:  # YAML would keep the last silently
                    dotted = ".".join(str(p) for p in sub)
                    raise ConfigError(f"duplicate key '{dotted}' (first on line {lines[sub]})",
                                      where=f"{filename}:{key.start_mark.line + 1}", hint="keep one of them")
                lines[sub] = key.start_mark.line + 1
                walk(value, sub)
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                lines[path + (i,)] = item.start_mark.line + 1
                walk(item, path + (i,))

    if root is not None:
        walk(root, ())
    return lines


def _allowed_keys(model_cls, loc: tuple) -> list[str]:
    """Field names valid at `loc` (a pydantic error location), for did-you-mean hints."""
    cls = model_cls
    for part in loc[:-1]:
        if isinstance(part, int) or cls is None:
            continue
        field = cls.model_fields.get(part)
        if field is None:
            return []
        ann = field.annotation
        cls = _section_of(ann)
    return list(cls.model_fields) if cls is not None else []


def _section_of(annotation):
    """The Section class inside an annotation like Optional[X] or list[X], if any."""
    if isinstance(annotation, type) and issubclass(annotation, Section):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        found = _section_of(arg)
        if found is not None:
            return found
    return None


def _explain(exc: ValidationError, lines: dict[tuple, int], filename: str, overridden: set) -> ConfigError:
    """Turn pydantic's first error into one ConfigError line."""
    err = exc.errors()[0]
    loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith(("function-", "literal["))))
    loc = tuple(p for p in loc if p not in ("str", "list[str]", "LoraConfig", "QuantizationConfig"))
    key = ".".join(str(p) for p in loc) or "(top level)"
    line = None
    for n in range(len(loc), 0, -1):
        if tuple(str(p) for p in loc[:n]) in overridden:
            break
        if loc[:n] in lines:
            line = lines[loc[:n]]
            break
    where = f"{filename}:{line}" if line else ("command-line override" if overridden else filename)
    kind = err["type"]
    hint = None
    if kind == "value_error" and not loc:  # a check across sections (Config._consistent): its own words
        return ConfigError(err["msg"].removeprefix("Value error, "), where=where)
    if kind == "extra_forbidden":
        hint = did_you_mean(loc[-1], _allowed_keys(Config, loc))
        message = f"unknown key '{key}'"
    else:
        given = err.get("input")
        shown = json.dumps(given) if isinstance(given, (str, int, float, bool, type(None))) else type(given).__name__
        message = f"{key}: {err['msg'][0].lower() + err['msg'][1:]}, got {shown}"
        expected = (err.get("ctx") or {}).get("expected")
        if expected and isinstance(given, str):
            options = [o.strip().strip("'") for o in expected.replace(" or ", ",").split(",") if o.strip()]
            hint = did_you_mean(given, options)
    return ConfigError(message, where=where, hint=hint)


def parse_override(item: str) -> tuple[list[str], Any]:
    """`a.b=value` -> (['a', 'b'], parsed value); values are read as YAML scalars/lists."""
    if "=" not in item:
        raise ConfigError(f"override '{item}' is not of the form key.sub=value")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override '{item}' has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def _set_dotted(tree: dict, parts: list[str], value: Any) -> None:
    node = tree
    for i, part in enumerate(parts[:-1]):
        if isinstance(node, list):
            node = node[int(part)]
            continue
        nxt = node.get(part)
        if nxt is None:
            nxt = node[part] = {}
        if not isinstance(nxt, (dict, list)):
            raise ConfigError(f"override {'.'.join(parts)}: '{'.'.join(parts[: i + 1])}' is not a section")
        node = nxt
    if isinstance(node, list):
        node[int(parts[-1])] = value
    else:
        node[parts[-1]] = value


def _resolve_paths(tree: dict, base: Path) -> None:
    """Make relative paths in a raw config tree absolute against `base`."""

    def fix(value):
        if isinstance(value, str) and value and not Path(value).expanduser().is_absolute():
            return str((base / value).resolve())
        return str(Path(value).expanduser()) if isinstance(value, str) and value else value

    for section, key in (("model", "path"), ("model", "adapter"), ("train", "work_dir")):
        values = tree.get(section)
        if isinstance(values, dict) and values.get(key):
            values[key] = fix(values[key])
    data = tree.get("data")
    if isinstance(data, dict):
        if "cache_dir" in data and data["cache_dir"]:
            data["cache_dir"] = fix(data["cache_dir"])
        for name in DATASET_LISTS:
            for entry in data.get(name) or []:
                if isinstance(entry, dict) and "path" in entry:
                    entry["path"] = fix(entry["path"])


def _is_path_key(parts: list[str]) -> bool:
    if ".".join(parts) in PATH_KEYS:
        return True
    return len(parts) == 4 and parts[0] == "data" and parts[1] in DATASET_LISTS and parts[3] == "path"


def _path_sources(tree: dict, lines: dict, filename: str, overridden: set) -> dict[str, str]:
    """Where each path value came from: `"<file>:<line>"` or `"command line"`, by dotted key."""
    keys = [tuple(k.split(".")) for k in PATH_KEYS]
    data = tree.get("data") if isinstance(tree.get("data"), dict) else {}
    for name in DATASET_LISTS:
        keys += [("data", name, i, "path") for i in range(len(data.get(name) or []))]
    sources = {}
    for key in keys:
        dotted = ".".join(str(p) for p in key)
        if tuple(str(p) for p in key) in overridden:
            sources[dotted] = "command line"
        elif key in lines:
            sources[dotted] = f"{filename}:{lines[key]}"
    return sources


def load_config(path: str | Path | None, overrides: list[str] = (), base: dict | None = None) -> Config:
    """Read a YAML config (or start from `base`), apply `key=value` overrides, validate.

    Every path written in the file (model.path, data paths, data.cache_dir, train.work_dir)
    is relative to the file; a path given as an override is relative to the working dir.
    `config_path_source(cfg, key)` says which, for messages about a missing path.
    """
    lines: dict[tuple, int] = {}
    filename = "<overrides>"
    if path is not None:
        file = Path(path)
        filename = str(path)
        if not file.is_file():
            raise ConfigError(f"config file not found: {path}", hint="check the path, or run `tuneforge list-configs`")
        text = file.read_text()
        lines = _line_index(text, filename)
        tree = yaml.safe_load(text) or {}
        if not isinstance(tree, dict):
            raise ConfigError("the config must be a mapping of sections (model, data, train, parallel)", where=filename)
        _resolve_paths(tree, file.resolve().parent)
    else:
        tree = json.loads(json.dumps(base or {}))
    overridden = set()
    for item in overrides:
        parts, value = parse_override(item)
        overridden.add(tuple(parts))
        if _is_path_key(parts) and isinstance(value, str) and value:
            value = str((Path.cwd() / Path(value).expanduser()).resolve())
        try:
            _set_dotted(tree, parts, value)
        except (IndexError, ValueError):
            raise ConfigError(f"override {item}: no such list entry") from None
    try:
        config = Config.model_validate(tree)
    except ValidationError as exc:
        raise _explain(exc, lines, filename, overridden) from None
    config._path_sources = _path_sources(tree, lines, filename, overridden)
    return config


def config_path_source(config: Config, key: str) -> str:
    """`"c.yaml:7"`, `"command line"` or `""` (unknown): where the path at dotted `key` was written."""
    return config._path_sources.get(key, "")


def dump_config(config: Config) -> str:
    """The resolved config as YAML text (what `--print-config` shows and runs save)."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
