"""The run configuration: pydantic schema, YAML loading, dotted overrides, clear errors.

A config is a YAML file shaped like `Config` below. Unknown keys and wrong types are
`ConfigError`s that name the file and line, the dotted key, what was expected and, where a
close name exists, a "did you mean" suggestion. Paths written in the file are resolved
relative to the file; paths given as command-line overrides relative to the working dir.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from tuneforge.errors import ConfigError, did_you_mean


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, values are re-validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


class LoraConfig(Section):
    r: int = Field(16, gt=0)
    alpha: float = Field(32, gt=0)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: Union[Literal["all-linear"], list[str]] = "all-linear"


class QuantizationConfig(Section):
    bits: Literal[4, 8] = 4


class ModelConfig(Section):
    path: str = ""
    dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2", "varlen"] = "auto"
    gradient_checkpointing: bool = False
    compile: bool = False  # torch.compile each decoder block (tuneforge.model.compile)
    trust_remote_code: bool = False
    allow_pickle_weights: bool = False
    lora: Optional[LoraConfig] = None
    quantization: Optional[QuantizationConfig] = None


Format = Literal["alpaca", "openai", "sharegpt", "xtuner", "text", "internevo", "preference"]


class DatasetConfig(Section):
    path: str
    format: Format = "alpaca"
    weight: float = Field(1.0, gt=0)
    columns: dict[str, str] = Field(default_factory=dict)
    system: Optional[str] = None
    min_length: int = Field(0, ge=0)


class DataConfig(Section):
    datasets: list[DatasetConfig] = Field(default_factory=list)
    eval_datasets: list[DatasetConfig] = Field(default_factory=list)
    eval_split: float = Field(0.0, ge=0, lt=1)
    template: str = "tokenizer"
    max_length: int = Field(2048, ge=2)
    packing: Literal["none", "soft", "hard"] = "soft"
    sampler: Literal["random", "length_grouped", "sequential"] = "random"
    truncation: Literal["right", "drop"] = "right"
    num_workers: int = Field(0, ge=0)
    seed: int = 1024
    pack_buffer: int = Field(8192, ge=1)
    cache_dir: Optional[str] = None


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
    reference: Literal["auto", "adapter", "cached"] = Field(
        "auto", description="DPO's reference model: adapter (LoRA with the adapter disabled), cached (log-probs of "
        "the initial model computed once before training and cached on disk) or auto (adapter with LoRA, else cached).")


class TrainConfig(Section):
    micro_batch_size: int = Field(1, gt=0)
    gradient_accumulation: int = Field(1, gt=0)
    epochs: int = Field(1, gt=0)
    max_steps: Optional[int] = Field(None, gt=0)
    lr: float = Field(2.0e-5, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    warmup_ratio: float = Field(0.03, ge=0, le=1)
    lr_scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    min_lr_ratio: float = Field(0.0, ge=0, le=1)
    max_grad_norm: float = Field(1.0, ge=0)
    seed: int = 42
    save_every: int = Field(0, ge=0)
    keep_last: int = Field(2, ge=1)
    eval_every: int = Field(0, ge=0)
    eval_prompts: list[str] = Field(default_factory=list)
    work_dir: str = "runs/default"
    loss_chunk_size: int = Field(1024, gt=0)
    cpu_heap_trim_every: int = Field(5, ge=0)  # CPU: give freed heap back to the OS every N decoder layers of forward
    skip_nonfinite: bool = False
    log_every: int = Field(1, gt=0)
    objective: Literal["sft", "dpo", "orpo", "simpo", "reward"] = Field(
        "sft", description="What is trained: sft (next-token loss), dpo, orpo, simpo (preference pairs) or reward "
        "(a Bradley-Terry reward model); every objective but sft needs datasets of format preference.")
    preference: PreferenceConfig = Field(default_factory=PreferenceConfig,
                                         description="Settings of the preference objectives (beta, loss type, ...).")


class ParallelConfig(Section):
    strategy: Literal["auto", "single", "ddp", "fsdp", "deepspeed"] = "auto"
    zero: Literal[1, 2, 3] = 3
    offload: bool = False
    sequence_parallel: int = Field(1, ge=1)
    tensor_parallel: int = Field(1, ge=1)
    timeout_s: float = Field(1800.0, gt=0)  # a collective waiting longer (a hung rank) fails, naming the rank


class Config(Section):
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    parallel: ParallelConfig = Field(default_factory=ParallelConfig)

    @model_validator(mode="after")
    def _consistent(self) -> "Config":
        if self.model.quantization is not None and self.model.lora is None:
            raise ValueError("model.quantization (QLoRA) needs model.lora to be set")
        pairs = [d.format == "preference" for d in self.data.datasets + self.data.eval_datasets]
        if self.train.objective == "sft" and any(pairs):
            raise ValueError("datasets of format preference need train.objective dpo, orpo, simpo or reward")
        if self.train.objective != "sft" and not all(pairs):
            raise ValueError(f"train.objective {self.train.objective} needs every dataset in format preference")
        if self.train.objective != "sft" and self.data.packing == "hard":
            raise ValueError("data.packing hard cuts sequences; preference pairs need packing soft or none")
        if self.train.objective == "dpo" and self.train.preference.reference == "adapter" and self.model.lora is None:
            raise ValueError("train.preference.reference adapter needs model.lora (the reference is the model without it)")
        return self


# ----------------------------------------------------------------------------- loading

PATH_KEYS = ("model.path", "data.cache_dir")
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

    model = tree.get("model")
    if isinstance(model, dict) and "path" in model:
        model["path"] = fix(model["path"])
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


def load_config(path: str | Path | None, overrides: list[str] = (), base: dict | None = None) -> Config:
    """Read a YAML config (or start from `base`), apply `key=value` overrides, validate."""
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
        return Config.model_validate(tree)
    except ValidationError as exc:
        raise _explain(exc, lines, filename, overridden) from None


def dump_config(config: Config) -> str:
    """The resolved config as YAML text (what `--print-config` shows and runs save)."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
