"""``robustmerge eval`` and ``robustmerge eval-report`` subcommands."""

from __future__ import annotations


def _eval(args) -> int:
    import os
    import sys

    from .runner import evaluate

    try:
        results = _run(evaluate, args)
    except (FileNotFoundError, KeyError, ValueError) as exc:
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"robustmerge eval: error: {msg}", file=sys.stderr)
        return 2
    if os.environ.get("RANK", "0") != "0":
        return 0  # torchrun: rank 0 prints the gathered results
    for name, res in results.items():
        note = "" if res.get("complete", True) else f"  INCOMPLETE ({res['answered']} of {res['questions']} questions)"
        if res.get("gold"):
            note += f"  [gold: {res['gold']}]"
        print(f"{name:16s} {res['score']:7.2f}  (n={res['n']}){note}")
    return 0


def _run(evaluate, args):
    return evaluate(
        args.base, args.adapter, args.tasks, args.data_root, args.out,
        batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, limit=args.limit,
        label=args.name, adapter_task=args.adapter_task, registry=args.registry,
        dtype=args.dtype, device=args.device, quiet=args.quiet, num_chunks=args.num_chunks,
        chunk_idx=args.chunk_idx, log_samples=args.log_samples, restart=args.restart,
        scienceqa_dir=args.scienceqa_dir,
    )  # fmt: skip


def _report(args) -> int:
    from .report import write_report

    md, png = write_report(args.runs, out=args.output, registry=args.registry)
    with open(md, encoding="utf-8") as f:
        print(f.read(), end="")
    print(f"-> {md}, {png}")
    return 0


def add_eval_parsers(sub) -> None:
    e = sub.add_parser("eval", help="evaluate a LLaVA base model, optionally with an adapter, on MM-MergeBench tasks")
    e.add_argument("--base", required=True, help="Hugging Face LLaVA model folder or id (with its processor)")
    e.add_argument("--adapter", default=None, help="PEFT adapter folder (HF or original LLaVA layout); none: zero-shot")
    e.add_argument("--tasks", nargs="+", default=["all"], help="task names, or all / seen / unseen (default all)")
    e.add_argument("--data-root", required=True, help="MM-MergeBench root (instructions/ and datasets/ below it)")
    e.add_argument("--out", required=True, help="run folder for this model: answers (resumable) and results")
    e.add_argument("--name", default=None, help="row label in eval-report (default: from the adapter)")
    e.add_argument("--adapter-task", default=None, help="the task an individual adapter was trained on")
    e.add_argument("--batch-size", type=int, default=8)
    e.add_argument("--max-new-tokens", type=int, default=None, help="override every task's generation budget")
    e.add_argument("--limit", type=int, default=None, help="only the first N questions of each task")
    e.add_argument("--registry", default=None, help="task registry JSON (default: the built-in MM-MergeBench one)")
    e.add_argument("--dtype", default="auto", choices=["auto", "fp32", "fp16", "bf16"])
    e.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:1 ...")
    e.add_argument(
        "--num-chunks",
        type=int,
        default=None,
        help="split each task's questions into N chunks (the official scripts' --num-chunks); "
        "under torchrun / accelerate launch the ranks split them without this",
    )
    e.add_argument("--chunk-idx", type=int, default=None, help="the chunk this process answers (0..N-1)")
    e.add_argument(
        "--log-samples",
        action="store_true",
        help="write <task>/samples.jsonl: prompt, image, raw and parsed answer, target, score per sample",
    )
    e.add_argument(
        "--restart",
        action="store_true",
        help="discard a task's answers made with other settings instead of refusing to mix them",
    )
    e.add_argument(
        "--scienceqa-dir",
        default=None,
        help="folder with ScienceQA's problems.json and pid_splits.json (official gold and test split; "
        "default: DATA_ROOT/datasets/ScienceQA when present)",
    )
    e.add_argument("-q", "--quiet", action="store_true")
    e.set_defaults(func=_eval)

    r = sub.add_parser("eval-report", help="markdown table and PNG bar chart from eval run folders")
    r.add_argument("runs", nargs="+", help="folders written by robustmerge eval --out")
    r.add_argument("-o", "--output", default="eval_report", help="output path prefix (writes .md and .png)")
    r.add_argument("--registry", default=None)
    r.set_defaults(func=_report)
