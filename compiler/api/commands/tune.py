"""``lowbit tune MODEL --out DIR``: create TVM meta-schedule tuning records that ``lower-tvm`` applies."""

from __future__ import annotations


def register(sub) -> None:
    from lowbit.backends.tvm_tune import add_tune_arguments

    p = sub.add_parser("tune", help="create TVM tuning records (meta-schedule)", description=__doc__)
    add_tune_arguments(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from lowbit.backends.tvm_tune import run_tune

    return run_tune(args)
