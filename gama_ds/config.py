"""Recipe dataclasses: every field documents itself where it is declared.

A recipe is a YAML file whose sections map onto these dataclasses; `key=value` overrides
(dotted, e.g. `model.lora.r=16`) apply on top. Unknown keys and values of the wrong type are
errors that name the key, before anything is built. A field with a fixed set of values is a
`Literal`: that annotation is the one list of its choices, which loading and `check` enforce
and which the modules that act on the value read through `choices()`.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Literal

import yaml

from .data.prompts import TEMPLATES
from .data.soft_prompt import HINT, SENTINEL, TAGS
from .errors import GamaDsError

RECIPES_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "recipes")


class ConfigError(GamaDsError, ValueError):
    """A recipe key or value that cannot be used; the message names the key."""


GROUP_NAMES = ("llm", "lora", "audio_encoder", "aggregator", "qformer", "projections", "soft_prompt")
# model.trainable: what each setting trains (model/weights.py applies it); LoRA trains whenever
# there is LoRA, and the soft prompt whenever there is one. Its keys are the setting's choices.
TRAINABLE_GROUPS = {
    "proj": {"projections"},
    "qformer": {"aggregator", "projections"},
    "qformer_all": {"audio_encoder", "aggregator", "qformer", "projections"},
    "all": {"audio_encoder", "aggregator", "projections"},  # LTU's "all": every audio module
    # Not the reference's: `qformer_all` with the encoder frozen, for an encoder already trained
    # for the task that the stage should not disturb (the demo's warmed-up one).
    "all_but_encoder": {"aggregator", "qformer", "projections"},
}


@dataclass
class AudioConfig:
    """Sizes of the audio modules. The defaults are GAMA's."""

    width: int = 768  # encoder, aggregator and Q-Former width
    heads: int = 12  # attention heads in all three
    encoder_depth: int = 12  # modality-specific blocks + 1 shared block
    taps: tuple[int, int] = (8, 4)  # modality blocks whose outputs feed aggregator layers 1 and 2
    mlp_ratio: float = 4.0  # encoder MLP width / width
    ffn: int = 3072  # aggregator and Q-Former feed-forward width
    qformer_layers: int = 12  # cross-attention in every second layer
    num_queries: int = 32  # learned Q-Former queries = its prefix tokens
    qformer_dropout: float = 0.0  # the reference trains the Q-Former in eval mode: no dropout
    aggregator_dropout: float = 0.1  # BERT's default, as the reference's aggregator


@dataclass
class LoraConfig:
    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")
    # LLM modules trained in full and saved in the adapter (peft's modules_to_save), e.g.
    # [lm_head, embed_tokens]: what a randomly initialised LLM (the CPU demo's) needs to learn.
    modules_to_save: tuple[str, ...] = ()


@dataclass
class SoftPromptConfig:
    """GAMA-IT's soft prompt (docs/MODEL.md#the-soft-prompt): the clip's audio event tags in a
    sentence in the prompt's Input section, its `<hint>` replaced by `tokens` trainable embeddings.
    The paper gives the sentence only; every number here is ours."""

    tokens: int = 1  # trainable embeddings in place of <hint> ("a trainable soft-prompt vector")
    # The paper's sentence: <hint> marks the soft tokens, {tags} the tag list; each exactly once.
    template: str = "According to <hint>, you are allowed to use or partially use the following tags: {tags}"
    top_k: int = 5  # at most this many tags, the highest scores first
    threshold: float = 0.1  # a tag's score must be at least this (the tagger's sigmoid, in [0, 1])
    separator: str = "; "  # between tags (AudioSet names hold commas: "Vehicle horn, car horn, honking")
    # In place of the tag list when no tag passes; null: no sentence (nor soft tokens) for that clip.
    no_tags: str | None = "none"
    # The soft tokens start as the embedding rows of this text's tokens, repeated to fill them.
    init: str = "the audio tagger"

    def check(self, key: str = "model.soft_prompt") -> None:
        if self.tokens < 1:
            raise ConfigError(f"{key}.tokens must be at least 1, got {self.tokens}")
        for mark in (HINT, TAGS):
            if self.template.count(mark) != 1:
                raise ConfigError(
                    f"{key}.template must hold {mark} exactly once, got {self.template.count(mark)} in "
                    f"{self.template!r}"
                )
        if SENTINEL in self.template + self.separator + (self.no_tags or ""):
            raise ConfigError(f"{key}: U+E000 is reserved (it marks the soft tokens while tokenising)")
        if self.top_k < 1:
            raise ConfigError(f"{key}.top_k must be at least 1, got {self.top_k}")
        if not 0.0 <= self.threshold <= 1.0:  # also refuses NaN
            raise ConfigError(f"{key}.threshold is a tag score, within [0, 1]; got {self.threshold}")
        if not self.separator:
            raise ConfigError(f"{key}.separator must not be empty")
        if self.no_tags is not None and not self.no_tags.strip():
            raise ConfigError(
                f"{key}.no_tags must be a word (e.g. none) or null (no sentence), got {self.no_tags!r}"
            )
        if not self.init.strip():
            raise ConfigError(f"{key}.init must be a text whose token embeddings start the soft tokens")


@dataclass
class ModelConfig:
    variant: Literal["gama", "ltu"] = "gama"  # gama: 96-token prefix; ltu: 32 tokens, one linear projection
    llm: str = "llama-2-7b"  # an LLM shape preset (gama_ds/model/llm.py) or an HF model folder
    # paper: the aggregator uses the taps; released: the released checkpoints' behaviour (docs/MODEL.md)
    aggregator: Literal["paper", "released"] = "paper"
    audio: AudioConfig = field(default_factory=AudioConfig)
    lora: LoraConfig | None = field(default_factory=LoraConfig)  # null: no LoRA (stage 1)
    trainable: Literal[tuple(TRAINABLE_GROUPS)] = "qformer_all"  # the groups each trains: TRAINABLE_GROUPS
    attn_implementation: str = (
        "auto"  # auto (flash_attention_2 where it runs, else sdpa) | sdpa | eager | ...
    )
    gradient_checkpointing: bool = False  # for the LLM and the audio encoder
    # weights' dtype when built; training precision is the engine's business (train.precision)
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    soft_prompt: SoftPromptConfig | None = None  # GAMA-IT's tags sentence with trainable <hint> (null: none)

    def check(self) -> None:
        check_choices(self, "model")
        if self.soft_prompt is not None:
            self.soft_prompt.check()
        if self.variant == "ltu" and self.trainable in ("qformer", "qformer_all", "all_but_encoder"):
            raise ConfigError(
                f"model.trainable {self.trainable!r} needs the gama variant; LTU trains proj or all"
            )
        a = self.audio
        if a.width % a.heads:
            raise ConfigError(f"model.audio.width {a.width} is not divisible by model.audio.heads {a.heads}")
        if a.encoder_depth < 2 or not all(0 <= t < a.encoder_depth - 1 for t in a.taps):
            raise ConfigError(
                f"model.audio.taps {list(a.taps)} must index the {a.encoder_depth - 1} modality blocks "
                f"of an encoder of depth {a.encoder_depth}"
            )
        if self.lora is not None and self.lora.r < 1:
            raise ConfigError(f"model.lora.r must be at least 1, got {self.lora.r}")
        dropouts = {"model.audio.qformer_dropout": a.qformer_dropout}
        dropouts["model.audio.aggregator_dropout"] = a.aggregator_dropout
        if self.lora is not None:
            dropouts["model.lora.dropout"] = self.lora.dropout
        for key, p in dropouts.items():
            if not 0.0 <= p < 1.0:
                raise ConfigError(f"{key} is a dropout probability, within [0, 1); got {p}")


@dataclass
class ShardSource:
    path: str  # a directory written by `gama-ds convert`
    weight: float = 1.0  # mixing weight among the training sets


@dataclass
class DataConfig:
    train: tuple[ShardSource, ...] = ()  # shard sets to train on, mixed by weight
    eval: tuple[ShardSource, ...] = ()  # held-out shard sets for the periodic eval loss
    cutoff_len: int = 108  # text tokens per QA pair after truncation (the reference's cutoff)
    tokenizer: str | None = None  # an HF tokenizer folder, or "bytes"; default: model.llm's folder
    template: Literal[tuple(TEMPLATES)] = "alpaca_short"  # the prompt template (data/prompts.py)
    train_on_inputs: bool = True  # supervise the prompt too, as the reference does
    num_workers: int = 2  # DataLoader workers per rank (0: batches made in the training process)
    # How DataLoader workers start. Not fork (the parent holds thread pools);
    # spawn by default, as forkserver's workers die with a preemption's SIGTERM to the group.
    start_method: Literal["spawn", "forkserver"] = "spawn"
    shuffle_buffer: int = 1000  # examples held for shuffling, per worker and shard set
    examples_per_clip: int = 0  # 0: every QA pair of a clip each epoch; k: k of them
    bucket_batches: int = 8  # micro-batches per length-sorting window (1: no bucketing)
    # fail: stop, naming the shard, the sample and the cause; skip: count it, warn and go on
    on_bad_sample: Literal["fail", "skip"] = "fail"


@dataclass
class OptimConfig:
    lr: float = 1e-4  # peak learning rate
    group_lr: dict[str, float] = field(default_factory=dict)  # per-group overrides, e.g. {projections: 1e-3}
    weight_decay: float = 0.0  # the reference trains without weight decay
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    warmup_steps: int = 100  # linear warm-up from 0, then linear decay to 0 (the HF default)
    grad_clip: float = 1.0  # global gradient-norm clipping; 0 turns it off


@dataclass
class TrainConfig:
    global_batch_size: int = 256  # samples per optimizer step, whatever the number of nodes
    micro_batch_size: int = 4  # samples per rank per forward pass
    epochs: int = 1  # passes over the training stream
    max_steps: int = 0  # stop after this many optimizer steps (0: the epochs decide)
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"  # auto: bf16 on GPUs that have it, else fp32
    seed: int = 0  # model init, data order, dropout
    init: str | None = None  # a gama-ds export, or a reference GAMA/LTU checkpoint, to start from
    output_dir: str = "runs/train"  # checkpoints, metrics, the resolved recipe
    eval_every_steps: int = 0  # held-out loss every N steps (0: only at the end)
    # A failing rank ends the job (gama_ds/train/watchdog.py). A rank silent for this long (killed,
    # stopped, its node gone) is a failure; keep it well under a minute.
    heartbeat_timeout_s: float = 30.0
    # No rank taking a batch for this long, once the first step is done, is a failure (a hung
    # read, a lost GPU); it must cover the longest checkpoint save.
    stall_timeout_s: float = 300.0
    # The process group's own timeout for one collective: the last resort behind the watchdog,
    # and the longest a collective may legitimately wait (rank 0 reading the weights under ZeRO-3).
    collective_timeout_s: float = 900.0


@dataclass
class DeepSpeedSettings:
    zero_stage: Literal[2, 3] = 2  # 2: shard optimizer state and gradients; 3: also the (frozen) LLM
    config: str | None = None  # a DeepSpeed JSON; default gama_ds/ds_configs/zero<stage>.json
    offload: bool = False  # ZeRO-3 with optimizer and parameters in CPU memory (zero3_offload.json)
    param_persistence_threshold: int = 100_000  # ZeRO-3 keeps smaller tensors whole on every rank


@dataclass
class CheckpointConfig:
    every_steps: int = 500  # save every N optimizer steps (and at the end, and on SIGTERM/SIGUSR1)
    keep: int = 3  # complete checkpoints to keep


@dataclass
class LoggingConfig:
    every_steps: int = 10  # metrics line every N optimizer steps
    tensorboard: bool = True
    plot: bool = True  # loss and learning-rate curves as a PNG at the end
    trace_examples: bool = False  # examples/rank<r>.jsonl: the example keys of every step, per rank


@dataclass
class Recipe:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    deepspeed: DeepSpeedSettings = field(default_factory=DeepSpeedSettings)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def check(self) -> None:
        """Value checks that need no machine: every number a user sets."""
        self.model.check()
        positive = {
            "data.cutoff_len": self.data.cutoff_len,
            "data.shuffle_buffer": self.data.shuffle_buffer,
            "data.bucket_batches": self.data.bucket_batches,
            "train.micro_batch_size": self.train.micro_batch_size,
            "train.global_batch_size": self.train.global_batch_size,
            "train.epochs": self.train.epochs,
            "checkpoint.every_steps": self.checkpoint.every_steps,
            "checkpoint.keep": self.checkpoint.keep,
            "logging.every_steps": self.logging.every_steps,
        }
        non_negative = {
            "data.num_workers": self.data.num_workers,
            "data.examples_per_clip": self.data.examples_per_clip,
            "train.max_steps": self.train.max_steps,
            "train.eval_every_steps": self.train.eval_every_steps,
            "optim.warmup_steps": self.optim.warmup_steps,
            "optim.weight_decay": self.optim.weight_decay,
            "optim.grad_clip": self.optim.grad_clip,
            "deepspeed.param_persistence_threshold": self.deepspeed.param_persistence_threshold,
        }
        for key, value in positive.items():
            if value < 1:
                raise ConfigError(f"{key} must be at least 1, got {value}")
        for key, value in non_negative.items():
            if value < 0:
                raise ConfigError(f"{key} must not be negative, got {value}")
        t = self.train
        if not t.heartbeat_timeout_s >= 2:
            raise ConfigError(f"train.heartbeat_timeout_s must be at least 2, got {t.heartbeat_timeout_s:g}")
        if not t.stall_timeout_s >= t.heartbeat_timeout_s:
            raise ConfigError(
                f"train.stall_timeout_s {t.stall_timeout_s:g} must be at least train.heartbeat_timeout_s "
                f"{t.heartbeat_timeout_s:g}"
            )
        if not t.collective_timeout_s > t.stall_timeout_s:
            raise ConfigError(
                f"train.collective_timeout_s {t.collective_timeout_s:g} must exceed train.stall_timeout_s "
                f"{t.stall_timeout_s:g}, so that the watchdog names a hang before the process group cuts it"
            )
        if not self.optim.lr > 0:
            raise ConfigError(f"optim.lr must be positive, got {self.optim.lr}")
        for group, lr in self.optim.group_lr.items():
            if group not in GROUP_NAMES:
                raise ConfigError(f"optim.group_lr.{group}: no such group; groups: {', '.join(GROUP_NAMES)}")
            if not lr > 0:
                raise ConfigError(f"optim.group_lr.{group} must be positive, got {lr}")
        for name in ("data", "optim", "train", "deepspeed", "checkpoint", "logging"):
            check_choices(getattr(self, name), name)
        if self.global_batch_indivisible():
            raise ConfigError(
                f"train.global_batch_size {self.train.global_batch_size} is not a multiple of "
                f"train.micro_batch_size {self.train.micro_batch_size}"
            )
        for source in self.data.train + self.data.eval:
            if not source.weight > 0:
                raise ConfigError(f"data: weight of {source.path} must be positive, got {source.weight}")

    def global_batch_indivisible(self) -> bool:
        return self.train.global_batch_size % self.train.micro_batch_size != 0


def choices(section, name: str) -> tuple:
    """The values that the Literal field `name` of a recipe section (class or instance) allows."""
    cls = section if isinstance(section, type) else type(section)
    return typing.get_args(typing.get_type_hints(cls)[name])


def _check_choice(value, allowed: tuple, key: str) -> None:
    # 1 == True in Python: a choice matches in type as well as in value.
    if not any(value == a and type(value) is type(a) for a in allowed):
        raise ConfigError(f"{key} must be one of {', '.join(map(str, allowed))}; got {value!r}")


def check_choices(section, prefix: str) -> None:
    """Every Literal field of a section and of its subsections, for sections built in code."""
    hints = typing.get_type_hints(type(section))
    for f in dataclasses.fields(section):
        value, key = getattr(section, f.name), f"{prefix}.{f.name}"
        if typing.get_origin(hints[f.name]) is Literal:
            _check_choice(value, typing.get_args(hints[f.name]), key)
        elif dataclasses.is_dataclass(value):
            check_choices(value, key)


def _coerce(value, hint, key: str):
    """Check (and gently convert) one YAML value against a dataclass field's type."""
    origin = typing.get_origin(hint)
    if origin is Literal:
        _check_choice(value, typing.get_args(hint), key)
        return value
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], key)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping, got {value!r}")
        _, value_type = typing.get_args(hint)
        return {str(k): _coerce(v, value_type, f"{key}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping, got {value!r}")
        return from_dict(hint, value, key)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        args = typing.get_args(hint)
        if len(args) == 2 and args[1] is Ellipsis:
            args = (args[0],) * len(value)
        elif len(args) != len(value):
            raise ConfigError(f"{key} must have {len(args)} items, got {len(value)}")
        return tuple(_coerce(v, t, f"{key}[{i}]") for i, (v, t) in enumerate(zip(value, args, strict=True)))
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} must be a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be a string, got {value!r}")
        return value
    return value


def from_dict(cls, data: dict, prefix: str = ""):
    """Build dataclass `cls` from a mapping; unknown keys are errors naming the key."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(f"unknown key {where}{unknown[0]}; known keys: {', '.join(sorted(names))}")
    kwargs = {k: _coerce(v, hints[k], f"{prefix}.{k}" if prefix else k) for k, v in data.items()}
    return cls(**kwargs)


def parse_override(text: str) -> tuple[list[str], object]:
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not key=value")
    key, raw = text.split("=", 1)
    return key.strip().split("."), yaml.safe_load(raw)


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {text!r}: {part} is not a section")
        node[path[-1]] = value
    return data


def load_yaml(path_or_name: str) -> tuple[str, dict]:
    """A recipe file, or the name of a bundled one (stage1 ... stage5, tiny)."""
    path = path_or_name
    if not os.path.exists(path):
        bundled = os.path.join(RECIPES_DIR, f"{path_or_name}.yaml")
        if not os.path.exists(bundled):
            raise ConfigError(f"no recipe file {path_or_name!r} and no bundled recipe of that name")
        path = bundled
    with open(path, encoding="utf-8") as f:
        try:
            data = yaml.safe_load(f) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML: {err}") from err
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a recipe is a mapping of sections")
    return path, data


def load_recipe(path_or_name: str, overrides: list[str] = ()) -> Recipe:
    """A recipe file (or bundled name) with `key=value` overrides, checked."""
    path, data = load_yaml(path_or_name)
    data = apply_overrides(data, list(overrides))
    try:
        recipe = from_dict(Recipe, data)
        recipe.check()
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None
    return recipe
