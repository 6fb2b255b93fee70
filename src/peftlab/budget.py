"""Budget-matched comparison: for each PEFT method, the largest rank whose parameters stay within a budget
(LoRA/DoRA ``r``; AdaLoRA ``target_r``, counting its effective parameters after pruning), found by building
the model on the backbone and counting — a few builds per method, seconds for MiniLM.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import re

from . import config as config_mod
from .comparison import Cell
from .config import Config
from .errors import ConfigError

log = logging.getLogger("peftlab")

# AdaLoRA prunes from init_r down to target_r; 1.5× is the ratio of the shipped 12 → 8 setup.
INIT_R_FACTOR = 1.5


def parse_budget(value) -> int:
    """1M, 1.5M, 150k, 150000 → a parameter count."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([kKmM]?)\s*", str(value)) if not isinstance(value, bool) else None
    count = round(float(m.group(1)) * {"": 1, "k": 1e3, "m": 1e6}[m.group(2).lower()]) if m else 0
    if count < 1:
        raise ConfigError(f"budget: expected a parameter count like 1M, 1.5M, 150k or 150000, got {value!r}")
    return count


def count_for_budget(cfg: Config, id2label: dict[int, str], rank: int | None, cache: dict) -> tuple[int, int]:
    """(parameters counted against a budget, largest sensible rank) for ``cfg`` at ``rank``, by building
    the model: LoRA/DoRA trainable parameters; AdaLoRA the effective ones at target_r (what remains after
    pruning: r·(in+out)+r per module, plus modules_to_save); full: all trainable parameters."""
    from . import modeling  # torch: only when counting

    a = cfg.adapter
    key = json.dumps([config_mod.to_dict(cfg)["model"], a.method, a.target_modules, a.modules_to_save,
                      a.use_dora, a.bias, len(id2label), rank])
    if key not in cache:
        # AdaLoRA built at init_r = target_r = rank holds exactly the post-pruning shapes.
        adapter = dataclasses.replace(a, r=rank or a.r, init_r=rank or a.init_r, target_r=rank or a.target_r)
        model, _tok, _ = modeling.build(cfg.model, adapter, id2label, total_steps=100, schedule=(10, 20))
        if a.method == "adalora":
            counted = modeling.adalora_effective_parameters(model, {})
        else:
            counted = modeling.count_parameters(model)[0]
        dims = [min(m.get_base_layer().in_features, m.get_base_layer().out_features)
                for m in model.modules() if hasattr(m, "lora_A") and hasattr(m, "get_base_layer")]
        cache[key] = (counted, min(dims) if dims else 0)
        del model
    return cache[key]


def best_rank(count, budget: int) -> tuple[int | None, int, int]:
    """(largest rank whose count ≤ budget or None, its count, the rank cap); ``count(r)`` → (params, cap).

    The count is linear in the rank, so two builds give the estimate and two more confirm it; the walks
    below keep the answer exact should a method not be linear."""
    p1, cap = count(1)
    if p1 > budget:
        return None, p1, cap
    slope = count(2)[0] - p1 if cap >= 2 else 0
    r = min(cap, 1 + (budget - p1) // slope) if slope > 0 else 1
    while r > 1 and count(r)[0] > budget:
        r -= 1
    while r < cap and count(r + 1)[0] <= budget:
        r += 1
    return r, count(r)[0], cap


def choose_ranks(cells: list[Cell], budget: int) -> dict[str, dict]:
    """Set each PEFT cell's rank for ``budget``; return {method-setting: what was chosen}. A method over
    budget even at rank 1 has its cells skipped; full fine-tuning is kept as the reference, marked."""
    from . import data as data_mod  # pandas: only when counting

    cache: dict = {}
    labels: dict[str, dict] = {}
    chosen: dict[str, dict] = {}
    for cell in cells:
        group = f"{cell.method}-{cell.setting}"
        if group not in chosen:
            cfg = cell.config
            data_key = json.dumps(config_mod.to_dict(cfg)["data"])
            if data_key not in labels:  # the head's size counts: it is trained and saved
                labels[data_key] = data_mod.load(cfg.data, cfg.train.seed).labels.id2label
            id2label = labels[data_key]
            if cell.method == "full":
                counted = count_for_budget(cfg, id2label, None, cache)[0]
                chosen[group] = {"rank": None, "parameters": counted, "over_budget": counted > budget}
            else:
                rank, counted, cap = best_rank(functools.partial(count_for_budget, cfg, id2label, cache=cache), budget)
                chosen[group] = {"rank": rank, "parameters": counted, "over_budget": rank is None, "cap": cap}
            c = chosen[group]
            log.info("budget %s: %s → %s parameters (%s)", f"{budget:,}", group,
                     f"{c['parameters']:,}", "over budget" if c["over_budget"] else f"rank {c['rank']}")
        c = chosen[group]
        if c["over_budget"] and cell.method != "full":
            cell.status, cell.error = "skipped", f"over budget even at rank 1 ({c['parameters']:,} parameters)"
        elif c["rank"]:
            a = cell.config.adapter
            a.r, a.target_r, a.init_r = c["rank"], c["rank"], math.ceil(INIT_R_FACTOR * c["rank"])
    return chosen
