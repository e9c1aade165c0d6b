"""Structure-aware fuzzing (issue 17), bounded for CI (about 20 s on 2 cores; ``LOWBIT_FUZZ_SCALE``
multiplies the examples; ``benchmarks/fuzz.py --target structured-...`` runs longer campaigns).

Random-but-valid graphs are compiled with random recipes and checked against the float model (no crash,
no partial output, no wrong result); plans, calibration sets, pass-option strings and CLI option lists
are either accepted or refused with a ``LowbitError`` — never another exception, never a traceback."""

from __future__ import annotations

import collections
import os
import tempfile
from pathlib import Path

import pytest

pytest.importorskip("hypothesis")
from fuzz_strategies import (calibration_sets, check_calibration, check_cli_options, check_graph,  # noqa: E402
                             check_pass_options, check_plan, cli_option_lists, graphs, pass_option_strings, plans)
from hypothesis import HealthCheck, given, settings  # noqa: E402
from robust_models import tiny_llama  # noqa: E402

SCALE = float(os.environ.get("LOWBIT_FUZZ_SCALE", "1"))
OUTCOMES: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)


def _settings(n: int):
    return settings(max_examples=max(1, int(n * SCALE)), deadline=None, database=None, derandomize=True,
                    suppress_health_check=list(HealthCheck))


def _folder():
    return tempfile.TemporaryDirectory(prefix="lowbit-sfuzz-")


@_settings(8)
@given(graphs())
def test_random_graphs_compile_correctly_or_refuse(case):
    model, recipe, feeds = case
    with _folder() as tmp:
        OUTCOMES["graphs"][check_graph(model, recipe, feeds, Path(tmp))] += 1


@_settings(150)
@given(plans())
def test_random_plans_load_or_refuse(plan):
    with _folder() as tmp:
        OUTCOMES["plans"][check_plan(plan, Path(tmp))] += 1


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return tiny_llama(tmp_path_factory.mktemp("sfuzz") / "tiny.onnx")


@_settings(6)
@given(feeds=calibration_sets())
def test_random_calibration_sets(tiny_model, feeds):
    with _folder() as tmp:
        OUTCOMES["calibration"][check_calibration(feeds, tiny_model, Path(tmp))] += 1


@_settings(120)
@given(pass_option_strings())
def test_random_pass_options(text):
    OUTCOMES["pass-options"][check_pass_options(text)] += 1


@_settings(40)
@given(cli_option_lists())
def test_random_cli_options(case):
    with _folder() as tmp:
        OUTCOMES["cli-options"][check_cli_options(*case, Path(tmp))] += 1


def test_outcomes_cover_both_sides():
    """The generators are not degenerate: plans and pass options are sometimes accepted, sometimes refused."""
    for target in ("plans", "pass-options"):
        if OUTCOMES[target]:
            assert OUTCOMES[target]["accepted"] and OUTCOMES[target]["refused"], (target, OUTCOMES[target])


def test_the_graph_oracle_catches_a_planted_wrong_result(monkeypatch, tmp_path):
    """Independent check of the oracle: a 'compiler' that writes the float model with every weight × 1.3
    (finite, loads, runs) must be reported as a wrong result."""
    import numpy as np
    import onnx
    from fuzz_strategies import check_graph
    from onnx import numpy_helper
    from robust_models import matmul_model

    import lowbit

    def planted(src, recipe, *, output, **kwargs):
        proto = onnx.load(str(src))
        for init in proto.graph.initializer:
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * 1.3, init.name))
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        onnx.save(proto, str(output))

    monkeypatch.setattr(lowbit, "compile", planted)
    model = onnx.load(str(matmul_model(tmp_path / "m.onnx", (8, 8))))
    feeds = [{"x": np.random.default_rng(0).standard_normal((1, 8)).astype(np.float32)}]
    with pytest.raises(AssertionError, match="wrong result"):
        check_graph(model, "w8a8", feeds, tmp_path)
