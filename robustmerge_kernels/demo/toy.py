"""A tiny Llama-shaped model and toy tasks, to train real LoRA adapters offline in seconds.

Used by ``robustmerge demo`` and by the tests: nothing is downloaded; the base model is
built from a config with a fixed seed. Task ``k`` is "the next token is the current one
plus ``shift_k``", inside a block of tokens of its own: adapters trained on different
tasks really differ but do not contradict each other, so a merged adapter can be scored on
every task and a good merge can serve them all at once.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch

LLAMA_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
TASK_SHIFTS = (1, 3, 5, 7, 2, 6, 4, 1)
BLOCK = 8  # tokens per task block; task k uses tokens [8k, 8k + 8)


def tiny_llama(seed: int = 0, vocab: int = 64, hidden: int = 64, layers: int = 2, intermediate: int = 128):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def task_batch(task: int, vocab: int, batch: int = 16, length: int = 12, seed: int = 0) -> torch.Tensor:
    """Token sequences of toy task ``task``: within the task's block, previous token + shift."""
    blocks = vocab // BLOCK
    g = torch.Generator().manual_seed(1000 * task + seed)
    start = torch.randint(0, BLOCK, (batch, 1), generator=g)
    steps = torch.arange(length)[None, :] * TASK_SHIFTS[task % len(TASK_SHIFTS)]
    return (task % blocks) * BLOCK + (start + steps) % BLOCK


@torch.no_grad()
def task_loss(model, task: int, vocab: int, seed: int = 12345) -> float:
    ids = task_batch(task, vocab, batch=32, seed=seed)
    return float(model(input_ids=ids, labels=ids).loss)


def train_adapter(
    base,
    task: int,
    steps: int = 30,
    r: int = 4,
    lora_alpha: float = 8,
    target_modules: Sequence[str] = LLAMA_MODULES,
    lr: float = 1e-2,
    seed: int = 0,
    **lora_kwargs,
):
    """Train a LoRA adapter on a copy of ``base`` for ``steps`` AdamW steps; returns the PeftModel."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed + 17 * task)
    config = LoraConfig(
        r=r, lora_alpha=lora_alpha, target_modules=list(target_modules), lora_dropout=0.0, **lora_kwargs
    )
    model = get_peft_model(copy.deepcopy(base), config)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    vocab = base.config.vocab_size
    for step in range(steps):
        ids = task_batch(task, vocab, seed=step)
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()
