"""Command line: ``robustmerge merge``, ``robustmerge demo``, ``robustmerge backends``."""

from __future__ import annotations

import argparse
import sys

from .errors import AdapterError


def _merge(args) -> int:
    from . import merge

    result = merge(
        args.adapters,
        method=args.method,
        density=args.density,
        clamp_quantile=args.clamp_quantile,
        lam=args.lam,
        backend=args.backend,
        out=args.output,
        dtype=args.dtype,
        overwrite=args.overwrite,
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
    )
    report = result.report
    print(f"{report.summary()} -> {args.output}")
    for module, missing in report.partial_modules.items():
        print(f"  note: {module} merged without {', '.join(missing)} (absent there)")
    return 0


def _demo(args) -> int:
    from .demo import run_demo

    run_demo(tasks=args.tasks, steps=args.steps, out=args.output, backend=args.backend, overwrite=args.overwrite)
    return 0


def _backends(args) -> int:
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
    m.add_argument("adapters", nargs="+", help="PEFT adapter folders (adapter_config.json + weights)")
    m.add_argument("-o", "--output", required=True, help="output adapter folder (written atomically)")
    m.add_argument("--method", default="robustmerge", help="robustmerge (default), task_arithmetic, linear, ties, "
                   "dare_linear, dare_ties, magnitude_prune, cat, svd, ties_svd, dare_linear_svd, dare_ties_svd, "
                   "magnitude_prune_svd, pcb")  # fmt: skip
    m.add_argument("--density", type=float, default=0.2, help="fraction of each matrix kept (default 0.2)")
    m.add_argument("--clamp-quantile", type=float, default=0.8, help="lower clamp of A-row scales (default 0.8)")
    m.add_argument("--lam", type=float, default=2.0, help="fusion weight on merged A and B (default 2.0)")
    m.add_argument("--backend", default="auto", help="auto (default; $ROBUSTMERGE_BACKEND overrides), reference")
    m.add_argument("--dtype", default=None, help="output dtype (default: the inputs'): fp32, fp16, bf16")
    m.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    m.add_argument("--max-shard-size", default=None, help="split weights into indexed shards above this (e.g. 5GB); "
                   "peft 0.21 loads only unsharded adapters, so the default is one file")  # fmt: skip
    # baseline methods: options named as in PEFT's add_weighted_adapter
    m.add_argument("--weights", type=float, nargs="+", default=None, help="baselines: one weight per adapter (default 1.0)")
    m.add_argument("--majority-sign-method", default="total", choices=("total", "frequency"), help="ties, dare_ties")
    m.add_argument("--svd-rank", type=int, default=None, help="svd family: output rank (default: largest input rank)")
    m.add_argument("--svd-clamp", type=float, default=None, help="svd family: clamp factors at this quantile")
    m.add_argument("--seed", type=int, default=0, help="dare_*: seed of the hashed random drop (default 0)")
    m.add_argument("--pcb-ratio", type=float, default=0.1, help="pcb: fraction of balanced entries kept (default 0.1)")
    m.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    m.set_defaults(func=_merge)

    d = sub.add_parser("demo", help="train tiny adapters offline, merge them, load the result in peft")
    d.add_argument("--tasks", type=int, default=3)
    d.add_argument("--steps", type=int, default=60)
    d.add_argument("-o", "--output", default=None, help="keep the merged adapter here")
    d.add_argument("--backend", default="auto")
    d.add_argument("--overwrite", action="store_true", help="replace an existing --output folder")
    d.set_defaults(func=_demo)

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
