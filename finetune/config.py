"""The run config: YAML (``yaml.safe_load``) -> validated dataclasses, ``--set`` overrides, resolved save.

One YAML section per dataclass (``model, quant, lora, data, train, eval``); the field names are the
contract of docs/INTERFACES.md. Everything a user can get wrong is checked here, before any heavy work,
and reported as one ``UserError`` line: the file, the key, what was expected, what was found, and
(for typos) the nearest valid key.

Type rules (strict where a silent guess would be dangerous):
- ints are accepted where floats are expected; so are numeric strings, because PyYAML follows YAML 1.1,
  where ``4e-5`` (no dot) is a *string*, not a float;
- booleans must be real YAML booleans (``true``/``false``), never 0/1 or "yes" in quotes;
- ints must be ints (``bool`` is not an int here, ``2.0`` is not an int).

Paths (``model.path``, ``model.prequantized``, ``data.path``, ``train.output_dir``, ``eval.adapter``,
``eval.output_dir``) are resolved **relative to the current working directory**, not to the YAML file,
so ``python train.py configs/llama2.yaml`` run from the repo root finds ``models/Llama-2-7b-hf``. The
resolved (absolute) paths are what ``save_config`` writes into the run directory.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import types
import typing
from collections.abc import Hashable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from finetune.data.templates import check_template
from finetune.errors import UserError
from finetune.files import write_text_atomic  # exclusive temp file: never follows a planted symlink
from lora import LoRAError
from lora.inject import compile_target_regex
from lora.layer import check_hyperparameters
from quant import BLOCKSIZES, QUANT_TYPES  # the rules of quant.QuantConfig (no bitsandbytes import)

# ---------------------------------------------------------------------------------------------------
# the rules a value must follow, declared with its field (``validate`` checks them all in one loop)


@dataclass(frozen=True)
class Rule:
    """A check of one field's value beyond its type: a range, a set, a pattern or non-emptiness.

    ``says`` is what the error line states ("must be >= 1"); when left empty it is written from the
    range. A null value of an optional field is never checked (null is the documented default).
    """

    ge: float | None = None
    gt: float | None = None
    one_of: tuple[Any, ...] | None = None
    pattern: str | None = None
    non_empty: bool = False
    says: str = ""

    def holds(self, value: Any) -> bool:
        if self.non_empty:  # a string, or a list of strings none of which is empty
            return bool(value) and all(value if isinstance(value, list) else [value])
        if self.one_of is not None:
            return value in self.one_of
        if self.pattern is not None:
            return re.fullmatch(self.pattern, value) is not None
        return (self.ge is None or value >= self.ge) and (self.gt is None or value > self.gt)

    def text(self, nullable: bool) -> str:
        if self.says:
            return self.says
        rule = f"must be > {_num(self.gt)}" if self.gt is not None else f"must be >= {_num(self.ge)}"
        return rule + (" or null" if nullable else "")


def ruled(default: Any = dataclasses.MISSING, *, factory: Any = dataclasses.MISSING, **rule: Any) -> Any:
    """A dataclass field whose value must satisfy ``Rule(**rule)``."""
    return field(default=default, default_factory=factory, metadata={"rule": Rule(**rule)})


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


_COLUMN = dict(non_empty=True, says="must be a non-empty column name")


# Each field's comment (``#:`` lines just above the field, and/or a trailing ``#`` comment) is its meaning
# in the README's config reference, which scripts/config_reference.py writes from these dataclasses: a
# field needs one, and it should make sense on its own (what the value does, what null or auto means).


@dataclass
class ModelConfig:
    path: str = ""                      # required: the local HF model directory (config.json, *.safetensors)
    #: compute dtype on GPU (CPU always computes in float32)
    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    #: auto = cuda if available, else cpu; or cpu | cuda | cuda:N
    device: str = ruled("auto", pattern=r"auto|cpu|cuda(:\d+)?", says="must be auto, cpu, cuda or cuda:N")
    gradient_checkpointing: bool = False  # true trades ~30% more compute for much less activation memory
    #: a directory written by quant.save_quantized (then nothing is re-quantised), or null
    prequantized: str | None = None


@dataclass
class QuantConfig:
    enabled: bool = True                # 4-bit frozen base weights (QLoRA); false = a 16-bit base
    quant_type: Literal[QUANT_TYPES] = "nf4"  # nf4 (NormalFloat4, the QLoRA paper's data type) | fp4
    double_quant: bool = True           # quantise the per-block absmax constants too (~0.37 bit/param saved)
    #: weights per absmax scale (64 in the QLoRA paper)
    blocksize: int = ruled(64, one_of=BLOCKSIZES, says="must be a power of two from 32 to 4096")
    #: module-name patterns (names or regexes) kept in the compute dtype, not quantised
    skip: list[str] = field(default_factory=lambda: ["lm_head", "embed_tokens"])


@dataclass
class LoraConfig:
    """r, alpha and dropout follow lora's own rules (``lora.layer.check_hyperparameters``)."""

    #: train low-rank adapters only; false = full training (small models; needs quant.enabled: false)
    enabled: bool = True
    r: int = 16                         # adapter rank
    alpha: float = 32.0                 # scaling = alpha / r (alpha / sqrt(r) with use_rslora)
    dropout: float = 0.05               # dropout on the adapter input, in [0, 1)
    #: the modules to adapt: a list of module names, a regex over module paths, or all-linear
    targets: list[str] | str = ruled(factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"], non_empty=True,
                                     says="must be a non-empty list of module names, a regex or all-linear")
    use_rslora: bool = False            # true: scaling = alpha / sqrt(r) (rank-stabilised LoRA)


@dataclass
class DataConfig:
    path: str = ""                      # required: the CSV, JSONL or JSON file; one example per row
    format: Literal["auto", "csv", "jsonl", "json"] = "auto"  # auto = by extension (.csv / .jsonl / .json)
    input_column: str = ruled("input_text", **_COLUMN)  # the input text (the seeds: the email)
    #: the expected response (the seeds: the email's entities, one "span: TYPE" per line)
    output_column: str = ruled("output_text", **_COLUMN)
    text_column: str | None = None      # a single preformatted text column (guanaco style), or null
    #: token/tag rows (MultiNERD style, used when the input/output columns are absent): the tokens
    tokens_column: str = ruled("tokens", **_COLUMN)
    tags_column: str = ruled("ner_tags", **_COLUMN)  # token/tag rows: the tags, one per token
    #: the labels that integer tags index, e.g. [O, B-PER, I-PER]; null = the tags are label strings
    tag_labels: list[str] | None = ruled(None, non_empty=True, says="must be a non-empty list of labels "
                                         "(e.g. [O, B-PER, I-PER]) or null")
    #: alpaca | llama2-chat | chat (the model's own chat template) | a custom string with {input}
    template: str = "alpaca"
    instruction: str = "Extract entity from the given input:"  # the template's {instruction}
    system: str | None = None           # chat templates only: the system message (null = the template's own)
    #: tokens per example incl. BOS/EOS; long inputs are cut, never responses
    max_length: int = ruled(128, ge=16, says="is too small: must be >= 16 tokens (prompt + response + EOS)")
    train_on_prompt: bool = False       # false = loss on the response + EOS only; true = on the prompt too
    shuffle_seed: int = ruled(42, ge=0)  # seed of the shuffle before the train/test split
    #: the first N shuffled rows train (null = all but the test rows)
    train_size: int | None = ruled(4000, ge=1, says="must be >= 1 or null (all rows not in the test split)")
    #: the last N shuffled rows are held out, for the eval loss and eval.py (null = 0 test rows)
    test_size: int | None = ruled(1500, ge=0)
    #: text rows only: where the response starts (null = auto-detect: [/INST] or ### Response:)
    response_marker: str | None = ruled(None, non_empty=True, says="must be a non-empty string or null")


@dataclass
class TrainConfig:
    output_dir: str = "runs/default"    # the run dir: config.yaml, metrics.jsonl, checkpoints/, plots/
    micro_batch_size: int = ruled(1, ge=1)  # sequences per forward/backward
    #: micro-batches summed (token-weighted) before each optimizer step
    gradient_accumulation_steps: int = ruled(16, ge=1)
    #: optimizer steps; null = run train.epochs over the train split
    max_steps: int | None = ruled(None, ge=1, says="must be >= 1 or null (then train.epochs decides)")
    epochs: float = ruled(1.0, gt=0)    # passes over the train split when max_steps is null
    lr: float = ruled(4.0e-5, gt=0)     # peak learning rate (YAML 1.1 reads 4e-5 as a string: accepted too)
    weight_decay: float = ruled(0.0, ge=0)  # AdamW decoupled weight decay on the trained parameters
    #: adamw (torch, fused on CUDA) | adamw8bit | paged_adamw8bit (bitsandbytes)
    optimizer: Literal["adamw", "adamw8bit", "paged_adamw8bit"] = "adamw"
    scheduler: Literal["cosine", "linear", "constant"] = "cosine"  # the LR schedule after warmup
    warmup_steps: int = ruled(0, ge=0)  # linear warmup from 0 to lr over this many optimizer steps
    #: clip the global gradient norm to this; null = no clipping
    max_grad_norm: float | None = ruled(1.0, gt=0, says="must be > 0, or null to disable clipping")
    amp: Literal["auto", "bf16", "fp16", "fp32"] = "auto"  # auto = bf16 autocast on CUDA, fp32 on CPU
    logging_steps: int = ruled(50, ge=1)  # a metrics.jsonl line every N optimizer steps
    eval_steps: int = ruled(50, ge=1)   # the eval loss on the test split every N optimizer steps
    save_steps: int = ruled(50, ge=1)   # a checkpoint (adapter + trainer state) every N optimizer steps
    #: keep the last N checkpoints (plus the best by eval loss); null = keep all
    save_total_limit: int | None = ruled(3, ge=1)
    eval_max_batches: int | None = ruled(None, ge=1)  # cap the eval-loss batches; null = the whole split
    ce_chunk_size: int = ruled(1024, ge=1)  # tokens per cross-entropy chunk (bounds the fp32 logits memory)
    #: true = continue from the newest complete checkpoint (--resume); auto = that if there is one, else start
    resume: bool | Literal["auto"] = False
    seed: int = ruled(42, ge=0)         # torch/python RNG seed (adapter init, dropout, data order)
    group_by_length: bool = False       # batch examples of similar length together (less padding)
    compile: bool = False               # torch.compile each decoder layer (eager + a warning if unavailable)


@dataclass
class EvalConfig:
    #: the adapter directory to score; null = the run's final adapter; none = no adapter (model.path alone)
    adapter: str | None = None
    split: Literal["test", "train"] = "test"  # the split eval.py scores
    #: score only the first N rows of the split; null = all
    limit: int | None = ruled(None, ge=1, says="must be >= 1 or null (all rows)")
    max_new_tokens: int = ruled(64, ge=1)  # generation budget per answer
    batch_size: int = ruled(8, ge=1)    # prompts generated together (left-padded, KV cache)
    stop_at_eos: bool = True            # stop each answer at EOS; false = always max_new_tokens
    compute_loss: bool = True           # also the eval loss (one more forward over the split)
    output_dir: str | None = None       # where eval.py writes; null = <train.output_dir>/eval
    #: generate from a dense copy with the adapter merged (dequantised once): auto = if it fits in memory
    dense: bool | Literal["auto"] = "auto"
    compile: bool = False               # torch.compile the decode step (CUDA graphs on CUDA)


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """Plain nested dict (YAML-ready), sections in file order."""
        return {f.name: dataclasses.asdict(getattr(self, f.name)) for f in dataclasses.fields(self)}


SECTIONS: dict[str, type] = {"model": ModelConfig, "quant": QuantConfig, "lora": LoraConfig,
                             "data": DataConfig, "train": TrainConfig, "eval": EvalConfig}

_PATH_FIELDS = ("model.path", "model.prequantized", "data.path", "train.output_dir", "eval.adapter",
                "eval.output_dir")


# ---------------------------------------------------------------------------------------------------
# public API


def load_config(path: str | os.PathLike, overrides: list[str] | None = None,
                check_paths: bool = True) -> RunConfig:
    """Read, override, coerce and validate a run config; raise ``UserError`` with one line on any problem.

    ``overrides`` are ``section.key=value`` strings (the CLI's ``--set``); the value is parsed with
    ``yaml.safe_load`` (``train.lr=1e-4``, ``lora.targets=[q_proj,v_proj]``, ``train.max_steps=null``).
    ``check_paths=False`` skips the existence checks of the model directory and the data file (for
    tools that only read the config); paths are still made absolute.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file not found: {path} (give the path of a YAML file, "
                        "e.g. configs/llama2.yaml)")
    size = path.stat().st_size
    if size > MAX_CONFIG_BYTES:
        raise UserError(f"{path}: {size} bytes is not a run config (at most {MAX_CONFIG_BYTES} bytes; a "
                        "config is a few kilobytes): give the YAML file, e.g. configs/llama2.yaml")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not valid UTF-8 text ({e.reason} at byte {e.start})") from None
    try:
        raw = parse_yaml(text)
    except yaml.YAMLError as e:
        raise UserError(f"{path}:{_yaml_problem(e)}") from None
    if raw is None:
        raise UserError(f"{path}: the config file is empty; it needs at least model.path and data.path")
    return config_from_dict(raw, source=str(path), overrides=overrides, check_paths=check_paths)


def config_from_dict(raw: Any, source: str = "<config>", *, overrides: list[str] | None = None,
                     check_paths: bool = True) -> RunConfig:
    """Build a validated ``RunConfig`` from a nested dict (as YAML gives it); see ``load_config``."""
    if not isinstance(raw, dict):
        raise UserError(f"{source}: the top level must be a mapping of sections "
                        f"({', '.join(SECTIONS)}), got {type(raw).__name__}")
    raw = {k: (dict(v) if isinstance(v, dict) else v) for k, v in raw.items()}
    for name, value in raw.items():
        if name not in SECTIONS:
            hint = _did_you_mean(_clip(str(name)), SECTIONS)
            raise UserError(f"{source}: unknown section {_show(name)}{hint}")
        if value is not None and not isinstance(value, dict):
            raise UserError(f"{source}: section {_show(name)} must be a mapping of keys, got {_show(value)}")
    for item in overrides or []:
        _apply_override(raw, item)
    cfg = RunConfig(**{name: _build_section(name, cls, raw.get(name) or {}, source)
                       for name, cls in SECTIONS.items()})
    validate(cfg, source=source, check_paths=check_paths)
    return cfg


def validate(cfg: RunConfig, source: str = "<config>", check_paths: bool = True) -> None:
    """Check values (declared rules, cross-field rules, templates, paths); make paths absolute in place.

    Raise ``UserError``. Types were checked when the sections were built (``_coerce``); each field's
    own range or set is declared with it (``ruled``) and checked by one loop here; rules that belong
    to another package (lora's hyperparameters and regexes, the templates) are asked of that package.
    """
    for section, cls in SECTIONS.items():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            rule, value = f.metadata.get("rule"), getattr(getattr(cfg, section), f.name)
            if rule is None or value is None:
                continue
            if not rule.holds(value):
                nullable = type(None) in typing.get_args(hints[f.name])
                raise UserError(f"{source}: {section}.{f.name} {rule.text(nullable)}, got {_show(value)}")
    if not cfg.model.path:
        raise UserError(f"{source}: model.path is required (a local HF model directory with config.json)")
    if not cfg.data.path:
        raise UserError(f"{source}: data.path is required (a CSV, JSONL or JSON file)")
    if cfg.quant.enabled and not cfg.lora.enabled:
        raise UserError(f"{source}: quant.enabled is true but lora.enabled is false: 4-bit weights cannot "
                        "be trained; set quant.enabled: false for full training, or enable LoRA")
    _check_lora(cfg, source)
    check_template(cfg.data.template, source)
    for key in _PATH_FIELDS:
        value = _get(cfg, key)
        if value is not None:
            _set(cfg, key, os.path.abspath(os.path.expanduser(value)))
    if check_paths:
        _check_paths(cfg, source)


def _check_lora(cfg: RunConfig, source: str) -> None:
    """lora's hyperparameter rules, and the regexes matched against module paths (lora.targets,
    quant.skip), which must not be able to backtrack for hours: lora's rule (no repeat or alternation
    inside a repeat), checked at load."""
    lora_cfg = cfg.lora
    try:
        check_hyperparameters(r=lora_cfg.r, alpha=lora_cfg.alpha, dropout=lora_cfg.dropout, prefix="lora.")
    except LoRAError as e:
        raise UserError(f"{source}: {e}") from None
    if isinstance(lora_cfg.targets, str) and lora_cfg.targets != "all-linear":
        try:
            re.compile(lora_cfg.targets)
        except re.error as e:
            raise UserError(f"{source}: lora.targets is not a valid regex ({e}), got "
                            f"{_show(lora_cfg.targets)}") from None
    patterns = [("lora.targets", lora_cfg.targets)] if isinstance(lora_cfg.targets, str) else []
    patterns += [("quant.skip", p) for p in cfg.quant.skip]
    for key, pattern in patterns:
        if pattern == "all-linear":
            continue
        try:
            compile_target_regex(pattern, what=f"{key} regex")
        except LoRAError as e:
            raise UserError(f"{source}: {e}") from None


def save_config(cfg: RunConfig, path: str | os.PathLike) -> None:
    """Write the resolved config (absolute paths, every default spelled out) as YAML; reloadable."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False, allow_unicode=True))


# ---------------------------------------------------------------------------------------------------
# helpers


MAX_CONFIG_BYTES = 1 << 20  # a run config is a few kilobytes; PyYAML reads ~1 MB/s in pure Python
MAX_YAML_VALUES = 100_000  # values after alias expansion (a config has ~60; lists of targets, hundreds)
MAX_YAML_DEPTH = 64  # nesting levels (a config needs 3)


class YAMLLimitError(yaml.MarkedYAMLError):
    """A YAML document past what a run config can be: too deep, too many values once aliases expand,
    a value Python cannot hold. Raised while it is read, before anything is built from it."""

    def __init__(self, problem: str, mark: Any) -> None:
        super().__init__(problem=problem, problem_mark=mark)


def parse_yaml(text: str) -> Any:
    """``yaml.safe_load(text)`` with the run config's rules: duplicate keys refused, and the document
    bounded (``MAX_YAML_DEPTH`` levels, ``MAX_YAML_VALUES`` values with every alias expanded) so that
    an alias bomb (9 levels of 9 aliases: 387M strings from 200 bytes) is one error, not minutes and
    gigabytes. Raises ``yaml.YAMLError``."""
    try:
        return yaml.load(text, Loader=_SafeUniqueLoader)  # noqa: S506 -- a SafeLoader subclass
    except RecursionError:  # MAX_YAML_DEPTH keeps below Python's limit; this is a belt to those braces
        raise YAMLLimitError(f"nesting deeper than Python can read (keep it under {MAX_YAML_DEPTH} levels)",
                             None) from None


def _yaml_problem(e: yaml.YAMLError) -> str:
    """`` line L column C invalid YAML: <problem>`` (bounded) for an error line."""
    mark = getattr(e, "problem_mark", None)
    where = f" line {mark.line + 1} column {mark.column + 1}" if mark is not None else ""
    problem = getattr(e, "problem", None) or (str(e).splitlines() or ["unreadable"])[0]
    return f"{where} invalid YAML: {_clip(problem, 240)}"


class _SafeUniqueLoader(yaml.SafeLoader):
    """``yaml.safe_load`` semantics, except that a repeated key is an error instead of last-one-wins
    (two ``data:`` sections would otherwise silently drop the first), and the bounds of ``parse_yaml``.
    Aliases are references in the composed node graph, so its expanded size is counted (each node once,
    memoised) before a single value is constructed."""

    _depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        self._depth += 1
        try:
            if self._depth > MAX_YAML_DEPTH:
                raise YAMLLimitError(f"nested deeper than {MAX_YAML_DEPTH} levels; a run config needs 3 "
                                     "(section, key, list)", self.peek_event().start_mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_document(self, node: yaml.Node) -> Any:
        _check_expansion(node)
        return super().construct_document(node)

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep=deep)
        except (ValueError, OverflowError) as e:  # an int past 4300 digits, a date like 2020-13-45
            shown = _show(node.value, 40) if isinstance(node, yaml.ScalarNode) else "here"
            why = str(e) if "integer string conversion" not in str(e) else "an integer of over 4300 digits"
            raise YAMLLimitError(f"cannot read the value {shown} ({_clip(why, 120)})",
                                 node.start_mark) from None

    def construct_yaml_int(self, node: yaml.ScalarNode) -> int:
        value = super().construct_yaml_int(node)
        if value.bit_length() > 14_000:  # 0x/0b/0o ints are not capped by Python; printing them back is
            raise ValueError("an integer of over 4300 digits")
        return value

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, Hashable):
                continue  # SafeConstructor's own check says "found unhashable key", with its line
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {_show(key)}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


_SafeUniqueLoader.add_constructor("tag:yaml.org,2002:int", _SafeUniqueLoader.construct_yaml_int)


def _check_expansion(root: yaml.Node) -> None:
    """Raise ``YAMLLimitError`` when ``root`` holds more than ``MAX_YAML_VALUES`` values with every alias
    expanded, or contains itself; names the key path of the largest part and the line of its key."""
    sizes: dict[int, int] = {}
    busy: set[int] = set()

    def children(node: yaml.Node) -> list[yaml.Node]:
        if isinstance(node, yaml.SequenceNode):
            return node.value
        if isinstance(node, yaml.MappingNode):
            return [n for pair in node.value for n in pair]
        return []

    def size(node: yaml.Node) -> int:  # recursion depth <= MAX_YAML_DEPTH (compose_node's bound)
        key = id(node)
        if key not in sizes:
            if key in busy:
                raise YAMLLimitError("an alias refers to a collection it is inside of (a structure that "
                                     "contains itself); write the values out", node.start_mark)
            busy.add(key)
            sizes[key] = 1 + sum(size(child) for child in children(node))
            busy.discard(key)
        return sizes[key]

    if size(root) <= MAX_YAML_VALUES:
        return
    node, keys, mark = root, [], root.start_mark
    while isinstance(node, yaml.MappingNode) and node.value:
        key_node, node = max(node.value, key=lambda pair: sizes[id(pair[1])])
        keys.append(_clip(str(key_node.value), 40) if isinstance(key_node, yaml.ScalarNode) else "?")
        mark = key_node.start_mark
    raise YAMLLimitError(f"{'.'.join(keys) or 'the YAML'} expands to more than {MAX_YAML_VALUES} values "
                         "through its aliases (*name); a run config needs a few dozen: write the values "
                         "out instead of nesting aliases", mark)


class _Mismatch(Exception):
    """Internal: a value does not fit a type; carries the human description of the expected type."""


def _build_section(name: str, cls: type, values: dict[str, Any], source: str) -> Any:
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in values.items():
        if key not in hints:
            raise UserError(f"{source}: unknown key '{name}.{_clip(str(key))}'"
                            f"{_suggest_key(name, _clip(str(key)))}")
        try:
            kwargs[key] = _coerce(value, hints[key])
        except _Mismatch as e:
            expected, *hint = e.args
            raise UserError(f"{source}: {name}.{key} must be {expected}, got {_show(value)}{''.join(hint)}"
                            ) from None
    return cls(**kwargs)


def _coerce(value: Any, tp: Any) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        for option in options:
            try:
                return _coerce(value, option)
            except _Mismatch:
                pass
        parts = [part for a in options for part in _alternatives(a)]
        parts += ["null"] if type(None) in args else []
        raise _Mismatch(", ".join(parts[:-1]) + " or " + parts[-1])
    if origin is Literal:  # a closed vocabulary: anything else is a typo, answered with the nearest value
        if isinstance(value, str) and value in args:
            return value
        raise _Mismatch(_describe(tp), _did_you_mean(_clip(value), args) if isinstance(value, str) else "")
    if origin is list:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise _Mismatch(_describe(tp))
        return list(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):
            try:  # YAML 1.1 reads 4e-5 (no dot) as a string
                number = float(value.strip())
            except ValueError:
                raise _Mismatch(_describe(tp)) from None
        else:
            raise _Mismatch(_describe(tp))
        if not math.isfinite(number):
            raise _Mismatch("a finite number")
        return number
    elif tp is str:
        if isinstance(value, str):
            return value
    raise _Mismatch(_describe(tp))


def _alternatives(tp: Any) -> list[str]:
    """The words for each value a type allows, for a union's "true, false or auto"."""
    if tp is bool:
        return ["true", "false"]
    if typing.get_origin(tp) is Literal:
        return [str(a) for a in typing.get_args(tp)]
    return [_describe(tp)]


def _describe(tp: Any) -> str:
    if typing.get_origin(tp) is list:
        return "a list of strings"
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(map(str, typing.get_args(tp)))
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(tp, str(tp))


def _apply_override(raw: dict[str, Any], item: str) -> None:
    """``section.key=value`` -> raw[section][key] = safe_load(value), with a clear error for bad input.

    Control characters are refused in the key and in the value of a path key: YAML folds a newline in
    a plain scalar into a space (``data.path=a.csv<newline>b`` would read the file ``a.csv b``), and a
    path never holds one; other string values (templates, instructions) may hold newlines."""
    key, sep, text = item.partition("=")
    key = key.strip()
    shown = _show(item)
    bad = _CONTROL.search(key)
    if bad:
        raise UserError(f"--set {shown}: the key holds the control character {bad.group()!r} (at "
                        f"position {bad.start()}); write it as section.key=value on one line")
    if not sep or key.count(".") != 1:
        raise UserError(f"--set {shown}: expected section.key=value, e.g. --set train.lr=1e-4")
    section, name = key.split(".")
    if section not in SECTIONS:
        raise UserError(f"--set {shown}: unknown section {_show(section)}{_did_you_mean(section, SECTIONS)}")
    hints = typing.get_type_hints(SECTIONS[section])
    if name not in hints:
        raise UserError(f"--set {shown}: unknown key '{_clip(key)}'{_suggest_key(section, name)}")
    bad = _CONTROL.search(text)
    if key in _PATH_FIELDS and bad:
        raise UserError(f"--set {shown}: the path {key} holds the control character {bad.group()!r} (at "
                        f"position {bad.start()} of the value); a path never does: give it on one line")
    wants_str = hints[name] in (str, str | None)
    try:
        value = parse_yaml(text)
    except yaml.YAMLError as e:
        problem = _clip(getattr(e, "problem", None) or "unreadable", 160)
        if isinstance(e, YAMLLimitError):
            raise UserError(f"--set {shown}: {problem}") from None
        if not wants_str:
            raise UserError(f"--set {shown}: cannot parse the value {_show(text)} as YAML ({problem}); "
                            "quote it, e.g. --set 'data.instruction=\"a: b\"'") from None
        value = text
    if wants_str and value is not None and not isinstance(value, str):
        value = text  # e.g. a custom template "{input}" would otherwise parse as a YAML mapping
    if not isinstance(raw.get(section), dict):
        raw[section] = {}
    raw[section][name] = value


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _check_paths(cfg: RunConfig, source: str) -> None:
    model = Path(cfg.model.path)
    if not model.exists():
        raise UserError(f"{source}: model.path {model} does not exist; point it at a local HF model "
                        "directory (config.json + *.safetensors); relative paths are from the current "
                        "directory")
    if not model.is_dir():
        raise UserError(f"{source}: model.path {model} is not a directory; give the HF model directory")
    if not (model / "config.json").is_file():
        raise UserError(f"{source}: model.path {model} has no config.json; is it a Hugging Face model "
                        "directory?")
    if cfg.model.prequantized is not None and not Path(cfg.model.prequantized).is_dir():
        raise UserError(f"{source}: model.prequantized {cfg.model.prequantized} is not a directory "
                        "(write one with quant.save_quantized, or set it to null)")
    data = Path(cfg.data.path)
    if not data.is_file():
        raise UserError(f"{source}: data.path {data} does not exist or is not a file; relative paths are "
                        "from the current directory")


def _get(cfg: RunConfig, key: str) -> Any:
    section, name = key.split(".")
    return getattr(getattr(cfg, section), name)


def _set(cfg: RunConfig, key: str, value: Any) -> None:
    section, name = key.split(".")
    setattr(getattr(cfg, section), name, value)


def _did_you_mean(word: str, choices: typing.Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else ""


def _suggest_key(section: str, key: str) -> str:
    """Prefer the same key in another section (``lora.lr`` -> ``train.lr``), else the nearest name."""
    for other, cls in SECTIONS.items():
        if other != section and key in typing.get_type_hints(cls):
            return f"; did you mean '{other}.{key}'?"
    names = [f.name for f in dataclasses.fields(SECTIONS[section])]
    close = difflib.get_close_matches(key, names, n=1, cutoff=0.6)
    if close:
        return f"; did you mean '{section}.{close[0]}'?"
    elsewhere = {f.name: s for s, c in SECTIONS.items() if s != section for f in dataclasses.fields(c)}
    close = difflib.get_close_matches(key, list(elsewhere), n=1, cutoff=0.75)
    if close:
        return f"; did you mean '{elsewhere[close[0]]}.{close[0]}'?"
    return f" (valid keys: {', '.join(names)})"


def _show(value: Any, limit: int = 80) -> str:
    """``repr(value)`` for an error line, at most ``limit`` characters, built only as far as shown: a
    list of 387M strings from an alias bomb (or a list that contains itself) costs ~``limit`` steps."""
    out: list[str] = []
    room = limit + 1  # one past the limit: enough to know it must be cut

    def emit(text: str) -> None:
        nonlocal room
        out.append(text[:room])
        room -= len(text)

    def walk(v: Any) -> None:
        if room <= 0:
            return
        if isinstance(v, (str, bytes)):
            emit(repr(v[:room]) if len(v) > room else repr(v))
        elif isinstance(v, (list, tuple, set, frozenset, dict)):
            items = v.items() if isinstance(v, dict) else v
            opening, closing = "[]" if isinstance(v, list) else "()" if isinstance(v, tuple) else "{}"
            if isinstance(v, (set, frozenset)) and not v:
                emit(f"{type(v).__name__}()")
                return
            emit(opening)
            for i, item in enumerate(items):
                if room <= 0:
                    return
                if i:
                    emit(", ")
                if isinstance(v, dict):
                    walk(item[0])
                    emit(": ")
                    walk(item[1])
                else:
                    walk(item)
            emit("," + closing if isinstance(v, tuple) and len(v) == 1 else closing)
        elif isinstance(v, int) and v.bit_length() > 1000:  # repr refuses ints past 4300 digits
            emit(f"<an integer of about {int(v.bit_length() * 0.30103) + 1} digits>")
        else:  # numbers, booleans, None, dates: short reprs
            emit(repr(v))

    walk(value)
    text = "".join(out)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _clip(text: str, limit: int = 80) -> str:
    """At most ``limit`` characters of a string for an error line."""
    return text if len(text) <= limit else text[:limit - 3] + "..."
