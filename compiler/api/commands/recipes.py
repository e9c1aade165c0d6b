"""``lowbit recipes``: the named recipes and every registered pass with its options."""

from __future__ import annotations

import dataclasses

from lowbit.api.cli import emit


def register(sub) -> None:
    p = sub.add_parser("recipes", help="list recipes and passes", description=__doc__)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run)


def run(args) -> int:
    from lowbit.passmanager.manager import registered_passes
    from lowbit.passmanager.recipes import RECIPES

    passes = {name: {f.name: f.default for f in dataclasses.fields(cls.Options)}
              for name, cls in sorted(registered_passes().items())}
    payload = {"recipes": RECIPES, "passes": passes}

    def human():
        for name, pipe in RECIPES.items():
            print(f"{name:>24}  {pipe}")
        print()
        for name, opts in passes.items():
            print(f"{name:>24}  " + ", ".join(f"{k}={v}" for k, v in opts.items()))

    emit(args, payload, human)
    return 0
