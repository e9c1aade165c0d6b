"""Mutation testing over ``passes/`` and the quantization core (``compiler/quant/``).

A small AST mutator (mutmut and cosmic-ray assume a package laid out under its import name; lowbit
maps ``compiler/`` to ``lowbit`` through ``package-dir``): it stages the package once in a temporary
folder as ``lowbit/...`` (from pyproject's ``package-dir``), plants ONE mutant at a time in the
staged copy, runs the test files that cover that module with a timeout, and counts the mutant
killed when they fail.  A run past the timeout is reported as undecided and left out of the rate
(on the shared machine a slow run is not a failing test); re-run those with ``--only``.
Mutation operators:

* comparison flip (``<`` ↔ ``<=``, ``>`` ↔ ``>=``, ``==`` ↔ ``!=``, ``is`` ↔ ``is not``, ``in`` ↔ ``not in``)
* arithmetic swap (``+`` ↔ ``-``, ``*`` ↔ ``/``, ``//`` → ``/``, ``**`` → ``*``)
* off-by-one number (``n`` → ``n + 1``; ``0.5`` → ``0.6``…: ``x`` → ``x·1.1`` for floats)
* boolean flip (``True`` ↔ ``False``, ``and`` ↔ ``or``, ``not x`` → ``x``, unary minus dropped)
* swapped arguments (the first two positional arguments of a call)
* dropped statement (an assignment, augmented assignment or expression statement → ``pass``)

Messages are not mutated (string constants, ``self.fail``/``raise``/logger calls and report
dictionaries are skipped): a changed error message is not a wrong answer.

    nice python benchmarks/mutation.py --sample 120 --seed 0 [--modules passes/smooth.py ...]

prints one line per mutant and the kill rate per module; ``--list`` only counts mutation points.
"""

from __future__ import annotations

import argparse
import ast
import concurrent.futures
import copy
import difflib
import os
import queue
import random
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# module → the test files that cover it (fast ones; the whole suite is too slow per mutant)
COVER: dict[str, list[str]] = {
    "passes/smooth.py": ["test_verify.py", "test_search_objectives.py", "test_smooth_reference.py",
                         "test_bias_models.py", "test_before_expected.py", "test_smooth.py"],
    "passes/rotate.py": ["test_verify.py", "test_rotate_bias.py", "test_before_expected.py", "test_rotate.py",
                         "test_rotate_layernorm.py"],
    "passes/fold_norms.py": ["test_verify.py", "test_fold_norms.py", "test_before_expected.py", "test_rotate_bias.py"],
    "passes/quantize_weights.py": ["test_verify.py", "test_gptq_reference.py", "test_before_expected.py",
                                   "test_quantize_weights.py", "test_assign_bits.py"],  # the latter: split plans
    "passes/quantize.py": ["test_verify.py", "test_before_expected.py", "test_quantize.py"],
    "passes/quantize_acts.py": ["test_verify.py", "test_before_expected.py", "test_quantize_acts.py"],
    "passes/migrate_steps.py": ["test_verify.py", "test_untyped_models.py", "test_search_objectives.py", "test_migrate_steps_reference.py",
                                "test_dyadic_lsb.py", "test_before_expected.py"],
    "passes/dyadic.py": ["test_verify.py", "test_dyadic_lsb.py", "test_dyadic_overflow_bound.py",
                         "test_before_expected.py", "test_integer_check.py", "test_integer_tiny.py"],
    "passes/assign_bits.py": ["test_verify.py", "test_split_columns.py", "test_assign_bits.py", "test_refine.py"],
    "passes/calibrate.py": ["test_calibration.py", "test_verify.py", "test_smooth_reference.py"],
    "passes/canonicalize.py": ["test_verify.py", "test_edge_forms.py", "test_canonicalize.py", "test_before_expected.py"],
    "passes/integer_lut.py": ["test_verify.py", "test_integer_lut.py", "test_before_expected.py",
                              "test_integer_check.py", "test_integer_tiny.py"],
    "passes/quantize_embeddings.py": ["test_verify.py", "test_quantize_embeddings.py", "test_before_expected.py"],
    "compiler/quant/gptq.py": ["test_quant_refine.py", "test_mod.py",  # HQQ and MoD inside group_params
                               "test_rounding_ties.py", "test_gptq_obq_reference.py", "test_gptq_reference.py", "test_before_expected.py",
                               "test_quantize_weights.py"],
    "compiler/quant/rtn.py": ["test_rounding_ties.py", "test_gptq_obq_reference.py", "test_gptq_reference.py", "test_split_columns.py",
                              "test_before_expected.py", "test_quantize_weights.py", "test_sensitivity.py"],
    "compiler/quant/int8.py": ["test_rounding_ties.py", "test_integer_lut.py", "test_before_expected.py", "test_migrate_steps_reference.py",
                               "test_dyadic_lsb.py", "test_quantize.py", "test_integer_swiglu.py",
                               "test_integer_tiny.py"],
    "passes/quantize_kv.py": ["test_verify.py", "test_quantize_kv.py", "test_before_expected.py"],
    "passes/awq.py": ["test_verify.py", "test_edge_forms.py", "test_awq.py", "test_bias_models.py", "test_before_expected.py"],
    "passes/integer_swiglu.py": ["test_integer_swiglu.py", "test_integer_tiny.py", "test_integer_check.py",
                                 "test_before_expected.py"],
    "passes/integer_norms.py": ["test_integer_tiny.py", "test_integer_check.py", "test_edge_forms.py"],
    "passes/integer_attention.py": ["test_integer_tiny.py", "test_integer_check.py"],
    "compiler/quant/channel_scales.py": ["test_smooth_reference.py", "test_bias_models.py", "test_awq.py",
                                         "test_smooth.py", "test_migrate_steps_reference.py"],
    "compiler/quant/hqq.py": ["test_quant_refine.py", "test_quantize_weights.py"],
    "compiler/quant/sequential.py": ["test_sequential.py"],
    "compiler/quant/parallel.py": ["test_quantize_weights.py", "test_ray.py"],  # test_ray: slow, run whole (SLOW_OK)
    "compiler/quant/mod.py": ["test_mod.py"],
    "compiler/quant/mod_graph.py": ["test_mod.py", "test_lowbit_registry.py"],
    "compiler/quant/stats.py": ["test_edge_forms.py", "test_calibration.py", "test_stats_padding.py", "test_smooth_reference.py",
                                "test_migrate_steps_reference.py", "test_quantize.py"],
}

# slow files run whole for the modules they cover: the only tests that reach that code (test_ray: a local
# two-worker Ray cluster, ~2 min; skipped where Ray is not installed, so install lowbit[ray] to measure parallel.py)
SLOW_OK = {"test_ray.py"}

_CMP = {ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt, ast.Eq: ast.NotEq, ast.NotEq: ast.Eq,
        ast.Is: ast.IsNot, ast.IsNot: ast.Is, ast.In: ast.NotIn, ast.NotIn: ast.In}
_BIN = {ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Div, ast.Div: ast.Mult, ast.FloorDiv: ast.Div,
        ast.Pow: ast.Mult}
_QUIET_CALLS = {"fail", "warning", "info", "debug", "error", "exception", "setdefault"}
# calls whose first two arguments commute: swapping them is an equivalent mutant, never generated
# (min/max of two numbers or arrays; np.maximum/minimum/add/multiply are elementwise and symmetric)
_COMMUTATIVE = {"min", "max", "maximum", "minimum", "fmax", "fmin", "add", "multiply", "gcd", "lcm", "hypot",
                "logical_and", "logical_or", "logical_xor", "bitwise_and", "bitwise_or", "bitwise_xor"}


@dataclass(frozen=True)
class Mutant:
    module: str
    index: int  # the index-th mutation point of the module
    line: int
    kind: str


def _quiet(node: ast.AST, parents: dict) -> bool:
    """Inside a message: raise, self.fail/logger call, or an assignment into a report."""
    while node in parents:
        node = parents[node]
        if isinstance(node, ast.Raise):
            return True
        if isinstance(node, ast.Call):
            f = node.func
            if isinstance(f, ast.Attribute) and f.attr in _QUIET_CALLS:
                return True
        if isinstance(node, (ast.Assign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if any("report" in ast.unparse(t) or "stats" in ast.unparse(t) for t in targets):
                return True
        if isinstance(node, ast.JoinedStr):
            return True
    return False


def _call_name(call: ast.Call) -> str:
    f = call.func
    return f.attr if isinstance(f, ast.Attribute) else (f.id if isinstance(f, ast.Name) else "")


def _equivalent(node: ast.AST, kind: str, parents: dict) -> bool:
    """Operator sites whose mutant no input can tell apart (listed as equivalent in every session's notes).

    * swapped arguments of a commutative call (``min(a, b)`` → ``min(b, a)``: sessions 4–6 listed six);
    * ``reshape(..., -1)`` → ``-2``: numpy infers any negative dimension like ``-1`` (three listed).
    """
    if kind == "swap-args":
        return _call_name(node) in _COMMUTATIVE and len(node.args) == 2 and not node.keywords
    if kind == "number" and node.value == 1:
        neg = parents.get(node)
        call = parents.get(neg)
        return (isinstance(neg, ast.UnaryOp) and isinstance(neg.op, ast.USub) and isinstance(call, ast.Call)
                and _call_name(call) == "reshape" and neg in call.args)
    return False


def _points(tree: ast.Module) -> list[tuple[ast.AST, str]]:
    parents = {c: p for p in ast.walk(tree) for c in ast.iter_child_nodes(p)}
    out = []
    for node in ast.walk(tree):
        if _quiet(node, parents) or isinstance(node, ast.JoinedStr):
            continue
        if isinstance(node, ast.Compare) and type(node.ops[0]) in _CMP:
            out.append((node, "compare"))
        elif isinstance(node, ast.BinOp) and type(node.op) in _BIN:
            out.append((node, "arith"))
        elif isinstance(node, ast.Constant) and type(node.value) in (int, float) and not isinstance(node.value, bool):
            if not isinstance(parents.get(node), ast.Subscript) or True:
                out.append((node, "number"))
        elif isinstance(node, ast.Constant) and isinstance(node.value, bool):
            out.append((node, "bool"))
        elif isinstance(node, ast.BoolOp):
            out.append((node, "andor"))
        elif isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.Not, ast.USub)):
            out.append((node, "unary"))
        elif isinstance(node, ast.Call) and len(node.args) >= 2 and not any(
                isinstance(a, ast.Starred) for a in node.args[:2]) and not (
                isinstance(node.func, ast.Attribute) and node.func.attr in _QUIET_CALLS):  # a logging call's own args
            out.append((node, "swap-args"))
        elif isinstance(node, (ast.Assign, ast.AugAssign, ast.Expr)) and not (
                isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)):
            if isinstance(parents.get(node), (ast.FunctionDef, ast.For, ast.If, ast.With, ast.While, ast.Try)):
                out.append((node, "drop"))
    return [(n, k) for n, k in out if not _equivalent(n, k, parents)]


class _Apply(ast.NodeTransformer):
    def __init__(self, target: ast.AST, kind: str):
        self.target, self.kind = target, kind

    def visit(self, node):
        if node is not self.target:
            return self.generic_visit(node)
        k = self.kind
        if k == "compare":
            node.ops[0] = _CMP[type(node.ops[0])]()
        elif k == "arith":
            node.op = _BIN[type(node.op)]()
        elif k == "number":
            node.value = node.value + 1 if isinstance(node.value, int) else (node.value * 1.1 or 0.1)
        elif k == "bool":
            node.value = not node.value
        elif k == "andor":
            node.op = ast.Or() if isinstance(node.op, ast.And) else ast.And()
        elif k == "unary":
            return node.operand
        elif k == "swap-args":
            node.args[0], node.args[1] = node.args[1], node.args[0]
        elif k == "drop":
            return ast.Pass()
        return node


def _message_statement(node: ast.AST) -> bool:
    """A dropped statement that only reports: ``self.fail(...)``/logging, or a stats/report update."""
    if isinstance(node, ast.Expr) and isinstance(node.value, ast.Call):
        f = node.value.func
        return isinstance(f, ast.Attribute) and f.attr in _QUIET_CALLS
    if isinstance(node, (ast.Assign, ast.AugAssign)):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target]
        return any("report" in ast.unparse(t) or "stats" in ast.unparse(t) for t in targets)
    return False


def enumerate_mutants(module: str, everything: bool = False) -> list[Mutant]:
    """Mutation points of ``module``; indices are positions in ``_points`` (stable), message statements skipped."""
    tree = ast.parse((ROOT / module).read_text())
    return [Mutant(module, i, getattr(n, "lineno", 0), k) for i, (n, k) in enumerate(_points(tree))
            if everything or not (k == "drop" and _message_statement(n))]


def mutated_source(m: Mutant) -> str:
    tree = ast.parse((ROOT / m.module).read_text())
    node, kind = _points(tree)[m.index]
    tree = _Apply(node, kind).visit(copy.copy(tree))
    ast.fix_missing_locations(tree)
    return ast.unparse(tree)


def show(ref: str) -> str:
    """The unified diff (unparsed original vs mutant) of ``MODULE#INDEX``; indices move when the module changes."""
    module, index = ref.rsplit("#", 1)
    m = next(m for m in enumerate_mutants(module, everything=True) if m.index == int(index))
    before = ast.unparse(ast.parse((ROOT / module).read_text())).splitlines()
    after = mutated_source(m).splitlines()
    diff = difflib.unified_diff(before, after, f"{module}", f"{ref} ({m.kind})", n=1, lineterm="")
    return "\n".join(diff)


def stage(dest: Path) -> dict[str, Path]:
    """Copy the package as lowbit/... under ``dest``; returns repo path → staged path for every .py file."""
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    where = {}
    for pkg, folder in sorted(cfg["package-dir"].items(), key=lambda kv: kv[0].count(".")):
        target = dest / Path(*pkg.split("."))
        target.mkdir(parents=True, exist_ok=True)
        for path in (ROOT / folder).iterdir():
            if path.is_file():
                shutil.copy2(path, target / path.name)
                where[str(path.relative_to(ROOT))] = target / path.name
            elif path.is_dir() and path.name not in ("__pycache__",) and not any(
                    (ROOT / f).resolve() == path.resolve() for f in cfg["package-dir"].values()):
                shutil.copytree(path, target / path.name, dirs_exist_ok=True)
    return where


def run_tests(stage_dir: Path, tests: list[str], timeout: float, why: list | None = None) -> str:
    """'killed' (a test failed; its id is appended to ``why``), 'survived', 'timeout' or 'no tests'."""
    data = os.environ.get("LOWBIT_DATA") or str((ROOT / ".." / "shared" / "data").resolve())
    env = dict(os.environ, PYTHONPATH=str(stage_dir), LOWBIT_VERIFY="1", PYTHONDONTWRITEBYTECODE="1", LOWBIT_DATA=data)
    base = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-k", "not minilm"]
    fast, whole = [t for t in tests if t not in SLOW_OK], [t for t in tests if t in SLOW_OK]
    runs = [base + ["-m", "not slow", *[str(ROOT / "tests" / t) for t in fast]]] if fast else []
    runs += [base + ["-m", "slow or not slow", *[str(ROOT / "tests" / t) for t in whole]]] if whole else []
    start, ran, failed = time.monotonic(), False, None
    for cmd in runs:
        try:
            res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True,
                                 timeout=max(timeout - (time.monotonic() - start), 1))
        except subprocess.TimeoutExpired:
            return "timeout"  # not counted as killed: on a loaded machine a slow run is not a failing test
        if res.returncode == 5:  # no tests collected (e.g. all deselected)
            continue
        ran = True
        if res.returncode != 0:
            failed = res
            break
    if not ran:
        return "no tests"
    if failed is None:
        return "survived"
    res = failed
    if why is not None:  # which test failed: a kill by an unrelated failure (data missing…) shows here
        lines = res.stdout.decode(errors="replace").splitlines()
        why.append(next((ln.split(" - ")[0] for ln in lines if ln.startswith(("FAILED", "ERROR"))), "?"))
    return "killed"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sample", type=int, default=120, help="mutants to run (sampled over all modules)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds per mutant (a timeout is not a kill)")
    ap.add_argument("--no-baseline", action="store_true",
                    help="skip the unmutated run of the covering tests (only when they were just run and pass)")
    ap.add_argument("--modules", nargs="*", default=sorted(COVER))
    ap.add_argument("--jobs", type=int, default=1, help="mutants run in parallel (one staged copy each)")
    ap.add_argument("--list", action="store_true", help="only count mutation points per module")
    ap.add_argument("--summarize", metavar="LOG", help="print the tables of a (possibly interrupted) run's output")
    ap.add_argument("--only", nargs="*", default=[], help="run these mutants only, as MODULE#INDEX (e.g. survivors)")
    ap.add_argument("--show", nargs="*", default=[], help="print the diff of these mutants (MODULE#INDEX) and exit")
    args = ap.parse_args(argv)
    if args.show:
        for ref in args.show:
            print(show(ref))
        return 0
    if args.summarize:
        return _summarize(Path(args.summarize).read_text().splitlines())
    pool = [m for mod in args.modules for m in enumerate_mutants(mod)]
    if args.list:
        for mod in args.modules:
            print(f"{mod}: {sum(1 for m in pool if m.module == mod)} mutation points")
        return 0
    # random order, so that a run cut short is still a sample of every module
    picked = random.Random(args.seed).sample(pool, min(args.sample, len(pool)))
    if args.only:
        wanted = {tuple(x.rsplit("#", 1)) for x in args.only}
        everything = [m for mod in {w[0] for w in wanted} for m in enumerate_mutants(mod, everything=True)]
        picked = [m for m in everything if (m.module, str(m.index)) in wanted]
        args.modules = sorted({m.module for m in picked})
    results: dict[str, list[tuple[Mutant, str]]] = {}
    with tempfile.TemporaryDirectory(prefix="lowbit-mutation-") as tmp:
        stages = queue.Queue()
        for j in range(args.jobs):
            stages.put((Path(tmp) / str(j), stage(Path(tmp) / str(j))))
        first = Path(tmp) / "0"
        baseline = "survived" if args.no_baseline else run_tests(
            first, sorted({t for mod in args.modules for t in COVER[mod]}), 3 * args.timeout)
        if baseline != "survived":
            print(f"baseline: the covering tests fail on the unmutated staged package ({baseline})")
            return 2

        def one(m: Mutant) -> tuple[Mutant, str]:
            folder, where = stages.get()
            path = where[m.module]
            original = path.read_text()
            start = time.perf_counter()
            try:
                path.write_text(mutated_source(m))
                why: list[str] = []
                outcome = run_tests(folder, COVER[m.module], args.timeout, why)
            finally:
                path.write_text(original)
                stages.put((folder, where))
            print(f"{outcome:16s} {m.module}#{m.index} line {m.line} {m.kind} ({time.perf_counter() - start:.0f}s)"
                  + (f" by {why[0]}" if why else ""), flush=True)
            return m, outcome

        with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool_exec:
            for m, outcome in pool_exec.map(one, picked):
                results.setdefault(m.module, []).append((m, outcome))
    return _report(results)


def _summarize(lines: list[str]) -> int:
    results: dict[str, list[tuple[Mutant, str]]] = {}
    for line in lines:
        parts = line.split()
        if len(parts) < 5 or parts[0] not in ("killed", "survived", "no", "timeout"):
            continue
        outcome = "killed" if parts[0] == "killed" else ("no tests" if parts[0] == "no" else parts[0])
        ref = next(p for p in parts if "#" in p)
        module, index = ref.rsplit("#", 1)
        kind = parts[parts.index("line") + 2]
        results.setdefault(module, []).append((Mutant(module, int(index), int(parts[parts.index("line") + 1]), kind),
                                               outcome))
    return _report(results)


def _report(results: dict[str, list[tuple[Mutant, str]]]) -> int:
    total_k = total = 0
    undecided = {mod: [m for m, o in rows if o in ("timeout", "no tests")] for mod, rows in results.items()}
    results = {mod: [(m, o) for m, o in rows if o not in ("timeout", "no tests")] for mod, rows in results.items()}
    results = {mod: rows for mod, rows in results.items() if rows}
    print("\nmodule                              killed / run")
    for mod, rows in sorted(results.items()):
        k = sum(1 for _, o in rows if o.startswith("killed"))
        total_k, total = total_k + k, total + len(rows)
        print(f"{mod:36s} {k:3d} / {len(rows):3d}  ({100 * k / len(rows):.0f} %)")
    print(f"{'all':36s} {total_k:3d} / {total:3d}  ({100 * total_k / max(total, 1):.1f} %)")
    for mod, ms in sorted(undecided.items()):
        for m in ms:
            print(f"  undecided (timeout or no tests, not counted): {m.module}#{m.index}")
    print("\nsurvivors:")
    for mod, rows in sorted(results.items()):
        for m, o in rows:
            if o == "survived":
                print(f"  {m.module}#{m.index} (line {m.line}, {m.kind})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
