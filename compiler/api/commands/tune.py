"""``lowbit tune MODEL --out DIR``: create TVM meta-schedule tuning records that ``lower-tvm`` applies."""

from __future__ import annotations


def register(sub) -> None:
    from lowbit.backends.tvm_tune import add_tune_arguments

    p = sub.add_parser("tune", help="create TVM tuning records (meta-schedule)", description=__doc__)
    add_tune_arguments(p)
    p.set_defaults(func=run)


def check_args(args) -> None:
    """Range checks at the door (the options come from ``lowbit.backends.tvm_tune``)."""
    from lowbit.api.preflight import check_instrument_dir, check_model_source
    from lowbit.errors import InputError

    if not 1 <= args.trials <= 1_000_000:
        raise InputError(f"--trials must be in [1, 1000000], got {args.trials}")
    if not 1 <= args.max_workers <= 1024:
        raise InputError(f"--max-workers must be in [1, 1024], got {args.max_workers}")
    for name, dims in args.shape:
        if not name or not dims or any(d < 1 for d in dims):
            raise InputError(f"--shape {name}={'x'.join(map(str, dims))}: needs a name and dimensions >= 1",
                             hint="e.g. --shape tokens=1x64")
    check_model_source(args.model)
    check_instrument_dir(args.out, "--out")


def run(args) -> int:
    from lowbit.backends.tvm_tune import run_tune

    check_args(args)
    return run_tune(args)
