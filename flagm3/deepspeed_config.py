"""``--deepspeed`` configs: the bundled ones by name, and other configs' optimizer sections handed to the Trainer.

- ``--deepspeed stage1`` / ``stage2`` / ``stage3`` (or ``ds_stage2.json`` with no such file in the working
  directory) resolve to the configs shipped inside the package (``flagm3/deepspeed_configs``).
- A config with an ``"optimizer"`` or ``"scheduler"`` section (FlagEmbedding's ``ds_stage0.json`` and
  ``ds_stage1.json``: AdamW and ``WarmupDecayLR`` from ``"auto"`` values) would make DeepSpeed build AdamW over
  one flat parameter list and give every group the scheduler's single ``warmup_max_lr``: the heads' own
  learning rates (the flagm3 recipe's sparse 3e-4, ``--head_learning_rate``) would silently become the
  encoder's. Both sections are left out, with one log line: the Trainer builds AdamW over its parameter groups
  from the command line (``--learning_rate``, ``--adam_*``, ``--weight_decay``) and its own schedule
  (``--lr_scheduler_type``, ``--warmup_steps``), and DeepSpeed wraps them.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any

BUNDLED_DIR = Path(__file__).resolve().parent / "deepspeed_configs"
_NAME_RE = re.compile(r"^(?:ds_)?(?:stage|zero)([123])(?:\.json)?$")
TRAINER_SECTIONS = ("optimizer", "scheduler")


def bundled_config(value: str) -> str:
    """The path of a shipped config for ``stage1``/``stage2``/``stage3`` (also ``zero2``, ``ds_stage2.json``)
    unless ``value`` is an existing file; anything else is returned unchanged."""
    match = _NAME_RE.match(os.path.basename(value))
    if os.path.exists(value) or match is None or os.sep in value:
        return value
    return str(BUNDLED_DIR / f"ds_stage{match.group(1)}.json")


def _section_summary(name: str, section: Any) -> str:
    kind = section.get("type", "?") if isinstance(section, dict) else "?"
    params = section.get("params", {}) if isinstance(section, dict) else {}
    explicit = {k: v for k, v in (params or {}).items() if v != "auto" and k != "torch_adam"}
    fixed = f", its explicit {explicit} unused" if explicit else ""
    return f'"{name}" ({kind}{fixed})'


def hand_optimizer_to_trainer(config: dict, source: str) -> list[tuple[int, str]]:
    """Remove ``config``'s optimizer and scheduler sections in place; one WARNING note naming them, or none."""
    found = [name for name in TRAINER_SECTIONS if name in config]
    if not found:
        return []
    summary = " and ".join(_section_summary(name, config.pop(name)) for name in found)
    return [(logging.WARNING, f"--deepspeed {source}: its {summary} section{'s' if len(found) > 1 else ''} left out: "
             "the Trainer builds AdamW over its parameter groups (each with its own learning rate: the sparse head's, "
             "--head_learning_rate) from --learning_rate/--adam_*/--weight_decay and the schedule from "
             "--lr_scheduler_type/--warmup_steps; DeepSpeed wraps them")]
