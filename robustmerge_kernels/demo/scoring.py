"""Scoring toy tasks: next-token accuracy, and a base model with an adapter's delta applied.

Accuracy is the metric the demo and the method comparison report: the share of positions
(after the first token) whose greedy next token is right, on a held-out batch. The base
model is near chance (1/64), a trained adapter near 1, so "how much of a task a merged
adapter keeps" is its accuracy divided by the individual adapter's (the RobustMerge
paper's normalised performance).
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from ..adapter_io.keys import PEFT_PREFIX, parse_factor
from ..adapter_io.scaling import module_scaling
from .toy import task_batch, train_adapter

EVAL_SEED = 12345  # held out: training batches use seeds 0 .. steps-1


@torch.no_grad()
def task_accuracy(model, task: int, vocab: int, seed: int = EVAL_SEED) -> float:
    ids = task_batch(task, vocab, batch=64, seed=seed)
    logits = model(input_ids=ids).logits
    return float((logits[:, :-1].argmax(-1) == ids[:, 1:]).float().mean())


@torch.no_grad()
def with_adapter(base, state_dict: dict[str, torch.Tensor], config: dict[str, Any] | None):
    """A copy of ``base`` with ``W += scaling * B @ A`` for every module of the adapter: what
    PEFT computes for a loaded LoRA adapter (``robustmerge demo`` checks that equality)."""
    model = copy.deepcopy(base)
    modules = dict(model.named_modules())
    for key, a in state_dict.items():
        parsed = parse_factor(key)
        if parsed is None or parsed.factor != "A":
            continue
        b = state_dict[parsed.saved_key().replace("lora_A", "lora_B")]
        scaling = module_scaling(config, parsed.module)[2] if config is not None else 1.0
        weight = modules[parsed.module.removeprefix(PEFT_PREFIX)].weight
        weight += (scaling * (b.double() @ a.double())).to(weight.dtype)
    return model.eval()


def train_pairs(
    base, tasks: int, steps: int, lr: float, r: int = 8, shared_init: bool = True
) -> list[tuple[dict, dict]]:
    """Train one adapter per toy task; return them as ``(state_dict, config)`` pairs.

    ``shared_init``: every adapter starts from the same LoRA initialisation (the same
    random A), as adapters trained with one fine-tuning script and seed do (LLaVA's
    scripts fix the seed). Methods that merge A and B separately (task_arithmetic, ties,
    dare, magnitude_prune, pcb, RobustMerge) rely on it: B_i @ A_j cross terms are noise
    when the A's are unrelated random matrices. ``False`` gives each task its own init.
    """
    from peft import get_peft_model_state_dict

    pairs = []
    for task in range(tasks):
        # train_adapter seeds torch with seed + 17 * task before peft draws A; the data
        # order does not depend on the seed, so this only chooses the initialisation.
        seed = -17 * task if shared_init else 0
        model = train_adapter(base, task, steps=steps, r=r, lora_alpha=2 * r, lr=lr, seed=seed)
        pairs.append((get_peft_model_state_dict(model), model.peft_config["default"].to_dict()))
    return pairs
