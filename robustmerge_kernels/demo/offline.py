"""``robustmerge demo``: train, merge and reload real adapters on a tiny model, offline.

Builds a tiny Llama from a config, trains one LoRA adapter per toy task with peft, saves
them as PEFT folders, merges them with RobustMerge through the public API, loads the
merged adapter back with ``PeftModel.from_pretrained``, checks its delta weights against
the returned tensors and prints per-task losses and next-token accuracies of base, each
adapter and the merge, and how much of each task's accuracy the merge keeps.

Training is chosen so each adapter really learns its task (accuracy near 1 against the
base's near 0) while its delta stays small enough to merge, and all adapters start from
one LoRA initialisation, as adapters trained with one script and seed do: with a random
A per task, every method that merges A and B separately mixes unrelated matrices.
``robustmerge demo --compare`` shows all methods and a sweep of lam and density.
"""

from __future__ import annotations

import copy
import os
import tempfile
import time
import warnings

import torch

from .. import merge
from .scoring import task_accuracy, with_adapter
from .toy import task_loss, tiny_llama, train_adapter

DEMO_STEPS = 30
DEMO_LR = 1e-2
GENTLE = {"lam": 0.5, "density": 1.0}  # the best RobustMerge setting of `robustmerge demo --compare`


def max_delta_error(peft_model, merged: dict[str, torch.Tensor], scaling: float) -> float:
    """Largest |delta_peft - (B* @ A*) * scaling| over the modules of a loaded merged adapter."""
    from peft.tuners.lora import LoraLayer

    worst = 0.0
    for name, module in peft_model.named_modules():
        if isinstance(module, LoraLayer) and "default" in module.lora_A:
            a = merged[f"{name}.lora_A.weight"].float()
            b = merged[f"{name}.lora_B.weight"].float()
            expected = (b @ a) * scaling
            worst = max(worst, (module.get_delta_weight("default").float() - expected).abs().max().item())
    return worst


def run_demo(
    tasks: int = 3,
    steps: int | None = None,
    out: str | None = None,
    backend: str = "auto",
    overwrite: bool = False,
    echo=print,
) -> dict:
    """The demo on one torch thread (restored afterwards): the model is tiny, and torch's
    thread pool competing with other processes for few cores made it 20x slower
    (171 s vs 8 s measured on a busy 2-core machine)."""
    # transformers 5 deprecation noise raised inside peft; it says nothing about the merge.
    warnings.filterwarnings("ignore", category=FutureWarning)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: one thread is fastest, and a shared machine's pool would thrash
    try:
        return _run_demo(tasks, DEMO_STEPS if steps is None else steps, out, backend, overwrite, echo)
    finally:
        torch.set_num_threads(threads)


def _run_demo(tasks, steps, out, backend, overwrite, echo) -> dict:
    from peft import PeftModel

    start = time.perf_counter()
    base = tiny_llama()
    vocab = base.config.vocab_size
    with tempfile.TemporaryDirectory(prefix="robustmerge-demo-") as tmp:
        folders = []
        for task in range(tasks):
            # one LoRA init for all tasks (seed + 17 * task = 0), as one training script and seed
            # give: merging A and B separately needs it (demo/scoring.py, train_pairs)
            model = train_adapter(base, task, steps=steps, r=8, lora_alpha=16, lr=DEMO_LR, seed=-17 * task)
            folder = os.path.join(tmp, f"task{task}")
            model.save_pretrained(folder)
            folders.append(folder)
            echo(f"trained adapter for toy task {task} ({steps} steps) -> {folder}")
        target = out or os.path.join(tmp, "merged")
        merged = merge(folders, backend=backend, out=target, overwrite=overwrite)
        echo(merged.report.summary() + f" -> {target}")

        loaded = PeftModel.from_pretrained(copy.deepcopy(base), target).eval()
        scaling = merged.config["lora_alpha"] / merged.config["r"]
        err = max_delta_error(loaded, merged, scaling)
        echo(f"peft loaded the merged adapter; max |delta - (B* @ A*) * scaling| = {err:.3g}")

        rows = (
            [("base", base)]
            + [
                (f"adapter {t}", PeftModel.from_pretrained(copy.deepcopy(base), f).eval())
                for t, f in enumerate(folders)
            ]
            + [("merged", loaded)]
        )
        losses = {name: [task_loss(m, t, vocab) for t in range(tasks)] for name, m in rows}
        accuracy = {name: [task_accuracy(m, t, vocab) for t in range(tasks)] for name, m in rows}
        # The paper's lam = 2 is tuned for LLaVA; one smaller setting shows what lam does here.
        gentle = merge(folders, backend=backend, **GENTLE)
        gentle_acc = [task_accuracy(with_adapter(base, dict(gentle), gentle.config), t, vocab) for t in range(tasks)]
    header = "model".ljust(12) + "".join(f"task {t} loss".rjust(13) for t in range(tasks))
    echo(header)
    for name, values in losses.items():
        echo(name.ljust(12) + "".join(f"{v:13.3f}" for v in values))
    echo("next-token accuracy (held-out batch):")
    for name, values in accuracy.items():
        echo(("  " + name).ljust(14) + "".join(f"{v:13.3f}" for v in values))
    own = [accuracy[f"adapter {t}"][t] for t in range(tasks)]
    kept = [m / o if o > 0 else float("nan") for m, o in zip(accuracy["merged"], own)]
    echo("the merged adapter keeps " + _kept_line(kept) + " (accuracy / the task's own adapter)")
    gentle_kept = [m / o if o > 0 else float("nan") for m, o in zip(gentle_acc, own)]
    echo(f"merged with lam={GENTLE['lam']}, density={GENTLE['density']} instead, it keeps " + _kept_line(gentle_kept))
    echo("robustmerge demo --compare: every merge method and lam/density on these tasks; robustmerge analyze: why")
    echo(f"demo finished in {time.perf_counter() - start:.1f} s")
    return {"losses": losses, "accuracy": accuracy, "kept": kept, "kept_gentle": gentle_kept, "delta_error": err,
            "report": merged.report}  # fmt: skip


def _kept_line(kept: list[float]) -> str:
    per_task = ", ".join(f"{100 * k:.0f}% of task {t}" for t, k in enumerate(kept))
    return per_task + f" (mean {100 * sum(kept) / len(kept):.0f}%)"
