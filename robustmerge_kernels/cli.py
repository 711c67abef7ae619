"""Command line: ``robustmerge merge``, ``analyze``, ``demo``, ``backends`` (and ``eval``)."""

from __future__ import annotations

import argparse
import sys

from .errors import AdapterError


def _merge(args: argparse.Namespace) -> int:
    from . import distributed

    # Under torchrun (WORLD_SIZE > 1) every rank runs this command: they merge one output
    # together, each writing its share of the file (robustmerge_kernels.distributed).
    started_group = distributed.init_from_environment()
    try:
        return _merge_and_report(args, world=distributed.world_size())
    finally:
        if started_group:
            import torch.distributed as dist

            dist.destroy_process_group()


def _merge_and_report(args: argparse.Namespace, world: int) -> int:
    from . import distributed, merge

    result = merge(
        args.adapters,
        method=args.method,
        density=args.density,
        clamp_quantile=args.clamp_quantile,
        lam=args.lam,
        backend=args.backend,
        out=args.output,
        dtype=args.dtype,
        overwrite="force" if args.force and args.overwrite else args.overwrite,
        progress=not args.quiet and sys.stderr.isatty(),
        max_shard_size=args.max_shard_size,
        keep_in_memory=False,  # the CLI only writes: output streams to disk, not held in memory
        # baseline methods (robustmerge_kernels.methods)
        weights=args.weights,
        majority_sign_method=args.majority_sign_method,
        svd_rank=args.svd_rank,
        svd_clamp=args.svd_clamp,
        seed=args.seed,
        pcb_ratio=args.pcb_ratio,
        distributed=world > 1,
        push_to_hub=args.push_to_hub,
    )
    if world > 1 and distributed.current().rank != 0:
        return 0  # one summary, from rank 0
    report = result.report
    print(f"{report.summary()} -> {args.output}" + (f" ({world} ranks)" if world > 1 else ""))
    for module, missing in report.partial_modules.items():
        print(f"  note: {module} merged without {', '.join(missing)} (absent there)")
    config = report.model_config
    if config.get("differs"):
        print(f"  note: config.json written from {config['from']}; it differs in {', '.join(config['differs'])} "
              f"(keys: {', '.join(config['differing_keys'])})")  # fmt: skip
    return 0


def _recover(args: argparse.Namespace) -> int:
    from .adapter_io.destination import recover

    for line in recover(args.output) or ["nothing to recover"]:
        print(line)
    return 0


def _analyze(args: argparse.Namespace) -> int:
    from .analysis import analyze

    result = analyze(
        args.adapters,
        args.merged or [],
        labels=args.labels,
        merged_labels=args.merged_labels,
        top_k=args.top_k,
        progress=not args.quiet and sys.stderr.isatty(),
    )
    files = result.write(args.output, plots=not args.no_plots)
    s = result.summary
    print(f"analysed {len(result.tasks)} adapters, {len(result.merged)} merged, {len(result.data['modules'])} modules "
          f"in {result.seconds:.1f} s -> {files['markdown']}")  # fmt: skip
    for m in result.merged:
        v = s["merged"][m]["mean"]
        print(f"  {m}: direction head {v['direction_head']:.3f} tail {_num(v['direction_tail'])}, "
              f"retention head {v['retention_head']:.3f} tail {_num(v['retention_tail'])}, "
              f"coefficient {v['adapter_coefficient']:.3f}")  # fmt: skip
    return 0


def _num(x) -> str:
    return "-" if x is None else f"{x:.3f}"


def _demo(args: argparse.Namespace) -> int:
    if args.compare:
        from .demo.compare import run_compare

        run_compare(tasks=args.tasks or 4, steps=args.steps, out=args.output, shared_init=not args.separate_init)
        return 0
    from .demo import run_demo

    run_demo(tasks=args.tasks or 3, steps=args.steps, out=args.output, backend=args.backend, overwrite=args.overwrite)
    return 0


def _backends(args: argparse.Namespace) -> int:
    from .backends import available_backends

    for name, state in available_backends(args.device).items():
        if name == "cpu" and state == "ok":  # which SIMD code path the CPU kernels dispatched to
            from .backends.cpu import simd_summary

            state = f"{state}, {simd_summary()}"
        print(f"{name:12s} {state}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="robustmerge", description="Merge LoRA adapters with RobustMerge.")
    sub = parser.add_subparsers(dest="command")

    m = sub.add_parser("merge", help="merge PEFT adapter folders into one PEFT adapter folder")
    m.add_argument("adapters", nargs="+", help="PEFT adapter folders (adapter_config.json + weights) or Hugging Face "
                   "Hub ids: org/name, org/name@revision, org/name/subfolder (HF_HUB_OFFLINE=1: the cache only)")  # fmt: skip
    m.add_argument("-o", "--output", required=True, help="output adapter folder (written atomically)")
    m.add_argument("--method", default="robustmerge", help="robustmerge (default), task_arithmetic, linear, ties, "
                   "dare_linear, dare_ties, magnitude_prune, cat, svd, ties_svd, dare_linear_svd, dare_ties_svd, "
                   "magnitude_prune_svd, pcb")  # fmt: skip
    m.add_argument("--density", type=float, default=0.2, help="fraction of each matrix kept (default 0.2)")
    m.add_argument("--clamp-quantile", type=float, default=0.8, help="lower clamp of A-row scales (default 0.8)")
    m.add_argument("--lam", type=float, default=2.0, help="fusion weight on merged A and B (default 2.0)")
    m.add_argument("--backend", default="auto", help="auto (default; $ROBUSTMERGE_BACKEND overrides), reference")
    m.add_argument(
        "--dtype",
        default=None,
        help="output dtype of every tensor: fp32, fp16, bf16 (default: "
        "LoRA factors of fp16/bf16 inputs in fp32, as the official RobustMerge code; fp32/fp64 inputs "
        "and averaged non-LoRA tensors keep their dtype)",
    )
    m.add_argument("--overwrite", action="store_true", help="replace an existing output adapter folder")
    m.add_argument("--force", action="store_true", help="with --overwrite: replace the output folder even if it "
                   "is not an adapter (no adapter_config.json)")  # fmt: skip
    m.add_argument("--max-shard-size", default=None, help="split weights into indexed shards above this (e.g. 5GB); "
                   "peft 0.21 loads only unsharded adapters, so the default is one file")  # fmt: skip
    # baseline methods: options named as in PEFT's add_weighted_adapter
    m.add_argument(
        "--weights", type=float, nargs="+", default=None, help="baselines: one weight per adapter (default 1.0)"
    )
    m.add_argument("--majority-sign-method", default="total", choices=("total", "frequency"), help="ties, dare_ties")
    m.add_argument("--svd-rank", type=int, default=None, help="svd family: output rank (default: largest input rank)")
    m.add_argument("--svd-clamp", type=float, default=None, help="svd family: clamp factors at this quantile")
    m.add_argument("--seed", type=int, default=0, help="dare_*: seed of the hashed random drop (default 0)")
    m.add_argument("--pcb-ratio", type=float, default=0.1, help="pcb: fraction of balanced entries kept (default 0.1)")
    m.add_argument("--push-to-hub", default=None, metavar="REPO", help="upload the written folder to this Hub "
                   "repository (created if needed) with a model card")  # fmt: skip
    m.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    m.set_defaults(func=_merge)

    d = sub.add_parser("demo", help="train tiny adapters offline, merge them, load the result in peft")
    d.add_argument("--tasks", type=int, default=None, help="toy tasks (default 3; 4 with --compare)")
    d.add_argument("--steps", type=int, default=None, help="training steps per adapter (default: the mode's)")
    d.add_argument("-o", "--output", default=None, help="keep the merged adapter here (--compare: the report folder)")
    d.add_argument("--compare", action="store_true", help="compare every merge method on the toy tasks (minutes)")
    d.add_argument("--separate-init", action="store_true", help="--compare: one LoRA init per task, not a shared one")
    d.add_argument("--backend", default="auto")
    d.add_argument("--overwrite", action="store_true", help="replace an existing --output folder")
    d.set_defaults(func=_demo)

    r = sub.add_parser("recover", help="finish an interrupted --overwrite of OUT; remove leftovers of dead merges")
    r.add_argument("output", help="the output folder of the interrupted merge")
    r.set_defaults(func=_recover)

    a = sub.add_parser("analyze", help="spectra, interference and what merged adapters keep, in low-rank space")
    a.add_argument("adapters", nargs="+", help="the task adapters (PEFT folders)")
    a.add_argument("--merged", nargs="+", default=None, metavar="M", help="merged adapters of those tasks to measure")
    a.add_argument("-o", "--output", required=True, help="report folder: analysis.json, analysis.md, *.png")
    a.add_argument("--top-k", type=int, default=4, help="head size: top singular directions (default 4)")
    a.add_argument("--labels", nargs="+", default=None, help="names of the task adapters in the report")
    a.add_argument("--merged-labels", nargs="+", default=None, help="names of the merged adapters")
    a.add_argument("--no-plots", action="store_true", help="JSON and markdown only")
    a.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    a.set_defaults(func=_analyze)

    b = sub.add_parser("backends", help="list backends and whether they can run here")
    b.add_argument("--device", default="cpu")
    b.set_defaults(func=_backends)

    from .eval.cli import add_eval_parsers

    add_eval_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command is None:  # the main job with no arguments is the offline demo
        args = build_parser().parse_args(["demo"])
    try:
        return args.func(args)
    except AdapterError as exc:
        print(f"robustmerge: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
