"""Meta-schedule records: produced by ``tune``, applied by ``lower_tvm``, results unchanged."""

from __future__ import annotations

import json

import numpy as np
import onnx_ir as ir
import pytest

pytest.importorskip("tvm")

from lowbit.backends.tvm_lower import lower_tvm  # noqa: E402
from lowbit.backends.tvm_tune import tune, tune_main  # noqa: E402
from lowbit.errors import LowbitError  # noqa: E402
from lowbit.ir.sessions import make_session  # noqa: E402
from lowbit.runtime.tvm_runner import TvmSession  # noqa: E402

import tvm_graphs as tg  # noqa: E402


@pytest.mark.slow  # meta-schedule: minutes for 4 trials on 2 busy cores; CI's slow step runs it
def test_tune_then_apply(tmp_path):
    model = ir.serde.deserialize_model(tg.float_linear(64, 64, bias=True))
    shapes = {"x": [4, 64]}
    db = tune(model, "llvm", trials=4, out_dir=tmp_path / "db", shape_dict=shapes)
    records = (db / "database_tuning_record.json").read_text().splitlines()
    workloads = (db / "database_workload.json").read_text().splitlines()
    assert records and workloads
    assert all(json.loads(r)[0] < len(workloads) for r in records)  # each record names a workload
    art = lower_tvm(model, "llvm", tmp_path / "out", shape_dict=shapes, tuning_db=db)
    assert json.loads(art.meta.read_text())["tuning_db"] == str(db)
    x = np.random.default_rng(0).standard_normal((4, 64)).astype(np.float32)
    got, = TvmSession(art.lib).run(None, {"x": x})
    ref, = make_session(model).run(None, {"x": x})
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def test_missing_records_are_refused(tmp_path):
    model = ir.serde.deserialize_model(tg.float_linear(64, 64))
    with pytest.raises(LowbitError, match="no such directory"):
        lower_tvm(model, "llvm", tmp_path, shape_dict={"x": [1, 64]}, tuning_db=tmp_path / "nope")


def test_tune_main_rejects_bad_shape(tmp_path):
    with pytest.raises(SystemExit):
        tune_main([str(tmp_path / "m.onnx"), "--out", str(tmp_path), "--shape", "x"])
