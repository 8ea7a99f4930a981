"""The ``flagm3 train`` command line: flagm3's argument classes plus every argument of FlagEmbedding 1.4.2's M3
fine-tuning that they do not define, so a FlagEmbedding launch script runs with only the module name changed.

FlagEmbedding 1.4.2 parses transformers 4's ``TrainingArguments``; transformers 5 dropped some of them. Each such
argument (and each FlagEmbedding data/model argument flagm3 has no use for) is in :data:`LEGACY_ARGUMENTS`: it is
either mapped onto its transformers 5 / flagm3 equivalent (``--warmup_ratio`` -> ``--warmup_steps`` as a fraction),
or accepted with one log line saying why it has no effect. An argument that exists in the installed transformers
is parsed natively (transformers 4.57 still has ``--warmup_ratio``). Mistakes end in one line and exit code 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import logging
import os
import re
import sys
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional, Sequence

from transformers import HfArgumentParser
from transformers.hf_argparser import string_to_bool

from .cli_convention import ConventionMixin
from .deepspeed_config import bundled_config, hand_optimizer_to_trainer
from .training_args import M3DataArguments, M3ModelArguments, M3TrainingArguments, recipe_warning

logger = logging.getLogger("flagm3.train")

Values = dict  # argument name -> value: every argument's (command line) or the given ones (a .json/.yaml file)


@dataclass(frozen=True)
class LegacyArgument:
    """A FlagEmbedding argument that flagm3's argument classes (or the installed transformers) do not define.

    ``apply`` maps its value onto other arguments and returns the log line; without it the argument has no
    effect here and ``reason`` says why.
    """

    name: str
    type: Callable[[str], Any]
    apply: Optional[Callable[[Values, Any], str]] = None
    reason: str = ""
    nargs: Optional[str] = None
    warn: bool = False  # a WARNING (the run trains differently from FlagEmbedding's), else INFO
    fe_default: Any = None  # FlagEmbedding's default: given at it, the line is INFO (nothing differs)


def _rename(target: str, convert: Callable[[Any], Any] = lambda v: v) -> Callable[[Values, Any], str]:
    def apply(values: Values, value: Any) -> str:
        values[target] = convert(value)
        return f"--{target} {values[target]} (transformers 5's name for it)"

    return apply


def _warmup_ratio(values: Values, ratio: float) -> str:
    if not 0 <= ratio < 1:
        raise ValueError(f"--warmup_ratio must be in [0, 1), got {ratio}")
    steps = values.get("warmup_steps") or 0
    if steps:
        return f"ignored: --warmup_steps {steps} is given and takes precedence, as in transformers 4"
    values["warmup_steps"] = ratio
    return (f"--warmup_steps {ratio}: transformers 5 reads a value below 1 as a fraction of the training steps "
            f"(warmup steps = ceil({ratio} x total steps))")


def _adafactor(values: Values, on: bool) -> str:
    if on:
        values["optim"] = "adafactor"
        return "--optim adafactor"
    return "off: the optimizer stays --optim"


def _logging_dir(values: Values, path: str) -> str:
    os.environ.setdefault("TENSORBOARD_LOGGING_DIR", path)
    return f"TENSORBOARD_LOGGING_DIR={os.environ['TENSORBOARD_LOGGING_DIR']} (transformers 5 reads it from there)"


def _fsdp_key(key: str) -> Callable[[Values, Any], str]:
    def apply(values: Values, value: Any) -> str:
        config = values.get("fsdp_config") or {}
        if isinstance(config, str):
            with open(config, encoding="utf-8") as f:
                config = json.load(f)
        values["fsdp_config"] = {**config, key: value}
        return f"--fsdp_config {{'{key}': {value!r}}}"

    return apply


def _hub_organization(values: Values, organization: str) -> str:
    name = (values.get("hub_model_id") or os.path.basename(os.path.normpath(values.get("output_dir") or "model")))
    values["hub_model_id"] = f"{organization}/{name.split('/')[-1]}"
    return f"--hub_model_id {values['hub_model_id']}"


def _include_inputs(values: Values, on: bool) -> str:
    if on:
        values["include_for_metrics"] = sorted({*(values.get("include_for_metrics") or []), "inputs"})
        return f"--include_for_metrics {' '.join(values['include_for_metrics'])}"
    return "off"


_REMOVED_IN_5 = "transformers 5 removed it"
LEGACY_ARGUMENTS: tuple[LegacyArgument, ...] = (
    # FlagEmbedding's model and data arguments
    LegacyArgument("config_name", str, reason="the encoder's config is the one in --model_name_or_path"),
    LegacyArgument("shuffle_ratio", float, warn=True, fe_default=0.0,
                   reason="flagm3 does not shuffle the words of passages (FlagEmbedding's text augmentation)"),
    LegacyArgument("small_threshold", int, warn=True, fe_default=0,
                   reason="flagm3 keeps every training file as its own dataset; small ones are not merged"),
    LegacyArgument("drop_threshold", int, warn=True, fe_default=0,
                   reason="flagm3 keeps every training file as its own dataset; merged small ones are not dropped"),
    # transformers 4's TrainingArguments that transformers 5 removed or renamed
    LegacyArgument("overwrite_output_dir", string_to_bool, nargs="?",
                   reason=f"{_REMOVED_IN_5}; flagm3 writes into an existing --output_dir (continue a run with "
                   "--resume_from_checkpoint)"),
    LegacyArgument("warmup_ratio", float, apply=_warmup_ratio),
    LegacyArgument("per_gpu_train_batch_size", int, apply=_rename("per_device_train_batch_size")),
    LegacyArgument("per_gpu_eval_batch_size", int, apply=_rename("per_device_eval_batch_size")),
    LegacyArgument("no_cuda", string_to_bool, nargs="?", apply=_rename("use_cpu")),
    LegacyArgument("adafactor", string_to_bool, nargs="?", apply=_adafactor),
    LegacyArgument("logging_dir", str, apply=_logging_dir),
    LegacyArgument("push_to_hub_model_id", str, apply=_rename("hub_model_id")),
    LegacyArgument("push_to_hub_organization", str, apply=_hub_organization),
    LegacyArgument("push_to_hub_token", str, apply=_rename("hub_token")),
    LegacyArgument("torchdynamo", str, apply=_rename("torch_compile_backend")),
    LegacyArgument("fsdp_min_num_params", int, apply=_fsdp_key("min_num_params")),
    LegacyArgument("fsdp_transformer_layer_cls_to_wrap", str, apply=_fsdp_key("transformer_layer_cls_to_wrap")),
    LegacyArgument("include_inputs_for_metrics", string_to_bool, nargs="?", apply=_include_inputs),
    LegacyArgument("save_safetensors", string_to_bool, nargs="?",
                   reason=f"{_REMOVED_IN_5}; models are always saved as safetensors"),
    LegacyArgument("use_mps_device", string_to_bool, nargs="?",
                   reason=f"{_REMOVED_IN_5}; an MPS device is used when available unless --use_cpu"),
    LegacyArgument("jit_mode_eval", string_to_bool, nargs="?",
                   reason=f"{_REMOVED_IN_5}; flagm3 evaluates retrieval with its own evaluator"),
    LegacyArgument("fp16_opt_level", str, reason=f"{_REMOVED_IN_5} (apex); --fp16 uses torch autocast"),
    LegacyArgument("half_precision_backend", str, reason=f"{_REMOVED_IN_5}; --fp16/--bf16 use torch autocast"),
    LegacyArgument("fp16_backend", str, reason=f"{_REMOVED_IN_5}; --fp16/--bf16 use torch autocast"),
    LegacyArgument("tpu_num_cores", int, reason=f"{_REMOVED_IN_5} (TPU launcher option)"),
    LegacyArgument("tpu_metrics_debug", string_to_bool, nargs="?", reason=f"{_REMOVED_IN_5} (TPU debugging)"),
    LegacyArgument("past_index", int, reason=f"{_REMOVED_IN_5}; encoders keep no past states"),
    LegacyArgument("use_legacy_prediction_loop", string_to_bool, nargs="?",
                   reason=f"{_REMOVED_IN_5}; flagm3 evaluates retrieval with its own evaluator"),
    LegacyArgument("mp_parameters", str, reason=f"{_REMOVED_IN_5} (SageMaker model parallelism)"),
    LegacyArgument("ray_scope", str, reason=f"{_REMOVED_IN_5}; flagm3 runs no hyperparameter search"),
    LegacyArgument("include_tokens_per_second", string_to_bool, nargs="?",
                   reason=f"{_REMOVED_IN_5}; the Trainer logs samples per second"),
)


_FP16_ONLY_KEYS = {"loss_scale", "initial_scale_power", "loss_scale_window", "hysteresis", "min_loss_scale",
                   "consecutive_hysteresis"}


def escape_percent(text: Optional[str]) -> Optional[str]:
    """Help text with every bare ``%`` doubled: argparse %-formats help strings (``%(default)s``)."""
    return None if text is None else re.sub(r"%(?!\(\w+\)[sdfr])", "%%", text.replace("%%", "%"))


class M3ArgumentParser(ConventionMixin, HfArgumentParser):
    """``HfArgumentParser`` over flagm3's argument classes, with FlagEmbedding's legacy arguments, help strings
    safe for argparse, and the command-line convention of every flagm3 subcommand (:mod:`flagm3.cli_convention`:
    both spellings, one-line errors with exit code 2 naming the closest known argument, defaults in ``--help``)."""

    def __init__(self, dataclass_types: Optional[Iterable[type]] = None, prog: str = "flagm3 train", **kwargs):
        if dataclass_types is None:
            dataclass_types = (M3ModelArguments, M3DataArguments, M3TrainingArguments)
        super().__init__(dataclass_types, prog=prog, allow_abbrev=False, **kwargs)
        self.legacy = {}
        group = self.add_argument_group("FlagEmbedding arguments mapped or without effect here")
        for arg in LEGACY_ARGUMENTS:
            if f"--{arg.name}" in self._option_string_actions:  # the installed transformers still has it
                continue
            extra = {"const": True} if arg.nargs == "?" else {}
            help_text = "maps to its transformers 5 equivalent" if arg.apply else f"no effect: {arg.reason}"
            group.add_argument(f"--{arg.name}", type=arg.type, nargs=arg.nargs, default=argparse.SUPPRESS,
                               help=help_text, **extra)
            self.legacy[arg.name] = arg
        for action in self._actions:
            action.help = escape_percent(action.help)

    @staticmethod
    def _parse_dataclass_field(parser: argparse.ArgumentParser, field: dataclasses.Field):
        # A field that two classes define (flagm3's group_by_length and transformers 4's) is parsed once and
        # given to both; the first class's default wins.
        if f"--{field.name}" in parser._option_string_actions:
            return
        HfArgumentParser._parse_dataclass_field(parser, field)

    def unknown(self, name: str):
        """Exit 2 with one line naming ``name`` (an option, or a key of an arguments file) and the closest known
        argument."""
        super().unknown(name if name.startswith("-") else f"--{name}")

    def given_names(self, argv: Sequence[str]) -> set[str]:
        """The argument names (``dest``) a command line gives explicitly."""
        given = set()
        for token in self.normalize_args(argv):
            action = self._option_string_actions.get(token.split("=", 1)[0]) if token.startswith("--") else None
            if action is not None:
                given.add(action.dest)
        return given

    # ------------------------------------------------------------------------------------------- parsing
    def parse(self, argv: Optional[Sequence[str]] = None) -> tuple[tuple, list[tuple[int, str]]]:
        """The argument dataclasses and the log lines (level, text) the legacy arguments produced.

        ``argv`` is a command line, or a single ``.json``/``.yaml`` file of arguments.
        """
        argv = list(sys.argv[1:] if argv is None else argv)
        if len(argv) == 1 and argv[0].endswith((".json", ".yaml", ".yml")):
            return self._parse_file(argv[0])
        namespace, remaining = self.parse_known_args(args=argv)
        if remaining:
            options = [r for r in remaining if r.startswith("-")]
            if options:
                self.unknown(options[0])
            self.error(f"unexpected value {remaining[0]!r} (values go after their --argument)")
        values = vars(namespace)
        legacy = {name: values.pop(name) for name in list(values) if name in self.legacy}
        notes = self._apply_legacy(values, legacy)
        self._check_installed(values)
        notes += self._adapt_deepspeed_config(values)
        outputs = []
        for dtype in self.dataclass_types:
            names = {f.name for f in dataclasses.fields(dtype) if f.init}
            outputs.append(self._build(dtype, {k: v for k, v in values.items() if k in names}))
        return tuple(outputs), notes + self._recipe_notes(outputs, self.given_names(argv))

    @staticmethod
    def _recipe_notes(outputs: Sequence[Any], given: set[str]) -> list[tuple[int, str]]:
        """The recipe warning (:func:`flagm3.training_args.recipe_warning`) for the flags given explicitly."""
        training = [o for o in outputs if isinstance(o, M3TrainingArguments)]
        warning = recipe_warning(training[0], given) if training else None
        return [(logging.WARNING, warning)] if warning else []

    def _parse_file(self, path: str) -> tuple[tuple, list[tuple[int, str]]]:
        try:
            with open(path, encoding="utf-8") as f:
                if path.endswith(".json"):
                    values = json.load(f)
                else:
                    import yaml

                    values = yaml.safe_load(f)
        except (OSError, ValueError) as err:  # missing file, bad JSON/YAML
            self.error(f"{path}: {err}")
        if not isinstance(values, dict):
            self.error(f"{path}: expected a mapping of argument names to values")
        values = {str(key).replace("-", "_"): value for key, value in values.items()}  # both spellings here too
        known = {action.dest for action in self._actions}
        for key in values:
            if key not in known:
                self.unknown(key)
        legacy = {name: values.pop(name) for name in list(values) if name in self.legacy}
        notes = self._apply_legacy(values, legacy)
        self._check_installed(values)
        notes += self._adapt_deepspeed_config(values)
        given = set(values)
        try:
            outputs = self.parse_dict(values)
        except (TypeError, ValueError) as err:
            self.error(f"{path}: {err}")
        return outputs, notes + self._recipe_notes(outputs, given)

    def _apply_legacy(self, values: Values, given: Values) -> list[tuple[int, str]]:
        notes = []
        for name, arg in self.legacy.items():  # table order: push_to_hub_model_id before _organization
            if name not in given:
                continue
            value = given[name]
            if arg.apply is None:
                text = f"--{name} has no effect here: {arg.reason}"
            else:
                try:
                    text = f"--{name} {value} -> {arg.apply(values, value)}"
                except (OSError, ValueError) as err:
                    self.error(str(err))
            differs = arg.warn and value != arg.fe_default
            notes.append((logging.WARNING if differs else logging.INFO, text))
        return notes

    def _check_installed(self, values: Values) -> None:
        """``--deepspeed`` without the deepspeed package: one line, before ``TrainingArguments`` half-builds
        transformers' global DeepSpeed config (which would break every later ``from_pretrained``)."""
        if values.get("deepspeed") and importlib.util.find_spec("deepspeed") is None:
            self.error("--deepspeed needs the deepspeed package: pip install 'flagm3[deepspeed]'")

    def _adapt_deepspeed_config(self, values: Values) -> list[tuple[int, str]]:
        """A DeepSpeed config file whose ``bf16`` section carries fp16's loss-scaling keys (FlagEmbedding's
        ``ds_stage1.json``) is passed on as a dict without them: bf16 needs no loss scaling, and current DeepSpeed
        refuses unknown keys there."""
        path = values.get("deepspeed")
        if isinstance(path, str):
            path = values["deepspeed"] = bundled_config(path)  # stage1/2/3: the configs shipped in the package
        if not isinstance(path, str) or not path.endswith(".json"):
            return []
        try:
            with open(path, encoding="utf-8") as f:
                config = json.load(f)
        except (OSError, ValueError) as err:
            self.error(f"--deepspeed {path}: {err}")
        if not isinstance(config, dict):
            return []
        notes = hand_optimizer_to_trainer(config, path)  # keeps every parameter group's learning rate
        bf16 = config.get("bf16")
        dropped = sorted(k for k in (bf16 if isinstance(bf16, dict) else {}) if k in _FP16_ONLY_KEYS)
        if dropped:
            config["bf16"] = {k: v for k, v in bf16.items() if k not in _FP16_ONLY_KEYS}
            notes.append((logging.INFO, f"--deepspeed {path}: its bf16 section's fp16 loss-scaling keys "
                          f"({', '.join(dropped)}) are left out: bf16 uses no loss scaling and DeepSpeed refuses them "
                          "there"))
        if notes:
            values["deepspeed"] = config
        return notes

    def _build(self, dtype: type, values: Values):
        try:
            return dtype(**values)
        except (TypeError, ValueError) as err:  # TrainingArguments' own consistency checks
            self.error(str(err))


def parse_train_args(argv: Optional[Sequence[str]] = None, parser: Optional[M3ArgumentParser] = None):
    """``(model_args, data_args, training_args)`` from a ``flagm3 train`` command line; logs the legacy notes."""
    outputs, notes = (parser or M3ArgumentParser()).parse(argv)
    for level, text in notes:
        logger.log(level, text)
    return outputs
