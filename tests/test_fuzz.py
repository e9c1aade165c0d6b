"""Fuzzing (hypothesis) of the model loader and the pipeline-string parser, bounded for CI.

The only exceptions allowed out of lowbit are ``LowbitError`` subclasses: anything else fails the
test with the input that caused it.  Counts (inputs tried, accepted, refused) are printed in a
"lowbit fuzz" section of pytest's terminal summary.  ``LOWBIT_FUZZ_SCALE`` multiplies the number
of examples (default 1: about a minute on 2 cores); ``benchmarks/fuzz.py`` runs longer campaigns.
"""

from __future__ import annotations

import collections
import os
import tempfile
import time
from pathlib import Path

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import lowbit  # noqa: E402
import lowbit.errors  # noqa: E402
from lowbit.ir.analysis import find_groups, find_linears  # noqa: E402
from lowbit.api.driver import check_weights  # noqa: E402
from lowbit.errors import LowbitError  # noqa: E402
from lowbit.frontends.llama2c import LlamaConfig, build_llama, random_llama_weights  # noqa: E402
from lowbit.passmanager.manager import CompileContext, PassManager, registered_passes  # noqa: E402
from lowbit.passmanager.pipeline import parse_pipeline  # noqa: E402
from lowbit.passmanager.recipes import RECIPES  # noqa: E402
from lowbit.ir.sessions import to_proto  # noqa: E402

SCALE = float(os.environ.get("LOWBIT_FUZZ_SCALE", "1"))
COUNTS: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
SECONDS: collections.Counter = collections.Counter()

_CFG = LlamaConfig(dim=8, hidden_dim=16, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=16, seq_len=8)
SEED_MODEL = to_proto(build_llama(_CFG, random_llama_weights(_CFG))).SerializeToString()  # ≈12 KB, mostly graph


def _settings(n: int):
    return settings(max_examples=max(1, int(n * SCALE)), deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.function_scoped_fixture])


class _Summary:
    def pytest_terminal_summary(self, terminalreporter):
        if not COUNTS:
            return
        terminalreporter.section("lowbit fuzz")
        for target, c in sorted(COUNTS.items()):
            terminalreporter.write_line(
                f"{target:<22} inputs {c['inputs']:>6}  accepted {c['accepted']:>6}  refused (LowbitError) "
                f"{c['refused']:>6}  crashes {c['crashes']}  {SECONDS[target]:.1f}s")


@pytest.fixture(scope="module", autouse=True)
def _report(request):
    plugin = _Summary()
    if not request.config.pluginmanager.is_registered(plugin):
        request.config.pluginmanager.register(plugin, "lowbit-fuzz-summary")
    yield


def _run(target: str, fn, *args):
    """Call ``fn``; count the outcome; let anything but a LowbitError fail the test."""
    COUNTS[target]["inputs"] += 1
    start = time.perf_counter()
    try:
        fn(*args)
        COUNTS[target]["accepted"] += 1
    except LowbitError:
        COUNTS[target]["refused"] += 1
    except BaseException:
        COUNTS[target]["crashes"] += 1
        raise
    finally:
        SECONDS[target] += time.perf_counter() - start


# --- the model loader --------------------------------------------------------------------------

@st.composite
def mutated_model(draw) -> bytes:
    data = bytearray(SEED_MODEL)
    for _ in range(draw(st.integers(1, 6))):
        op = draw(st.sampled_from(["flip", "set", "insert", "delete", "truncate", "duplicate"]))
        pos = draw(st.integers(0, max(len(data) - 1, 0)))
        if op == "flip" and data:
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "set" and data:
            data[pos] = draw(st.sampled_from([0, 1, 0x7F, 0x80, 0xFF, 0x08, 0x12, 0x1A, 0x22]))
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        elif op == "delete":
            del data[pos : pos + draw(st.integers(1, 64))]
        elif op == "truncate":
            del data[pos:]
        elif op == "duplicate":
            n = draw(st.integers(1, 256))
            data[pos:pos] = data[pos : pos + n]
    return bytes(data)


def _load_and_inspect(path: Path) -> None:
    model = lowbit.load_model(path)
    check_weights(model)
    find_linears(model.graph)
    find_groups(model.graph)


@pytest.fixture(scope="module")
def fuzz_dir():
    with tempfile.TemporaryDirectory(prefix="lowbit-fuzz-") as tmp:
        yield Path(tmp)


def test_seed_model_loads(fuzz_dir):
    (fuzz_dir / "seed.onnx").write_bytes(SEED_MODEL)
    _load_and_inspect(fuzz_dir / "seed.onnx")
    assert len(find_linears(lowbit.load_model(fuzz_dir / "seed.onnx").graph)) == 8


@_settings(600)
@given(data=mutated_model())
def test_fuzz_model_loader(fuzz_dir, data):
    path = fuzz_dir / "m.onnx"
    path.write_bytes(data)
    _run("load_model(.onnx)", _load_and_inspect, path)


@_settings(150)
@given(data=st.binary(max_size=512))
def test_fuzz_loader_random_bytes(fuzz_dir, data):
    for suffix in (".onnx", ".bin"):
        path = fuzz_dir / f"r{suffix}"
        path.write_bytes(data)
        _run(f"load_model({suffix}) bytes", _load_and_inspect, path)


# --- the pipeline-string parser ----------------------------------------------------------------

_PASSES = sorted(registered_passes())
_KEYS = sorted({f.name for cls in registered_passes().values() for f in cls.Options.__dataclass_fields__.values()})
_VALUES = st.one_of(st.integers(-3, 300).map(str), st.floats(allow_nan=True, allow_infinity=True).map(repr),
                    st.sampled_from(["true", "false", "none", "static", "dynamic", "", "1e999", "-0", "0x10", "a|b"]),
                    st.text(max_size=6))


def _field_values(cls) -> dict[str, list[str]]:
    """Per option of a pass: its default printed, plus neighbours of the right and wrong types."""
    import dataclasses

    out = {}
    for f in dataclasses.fields(cls.Options):
        d = f.default
        out[f.name] = [str(d).lower() if isinstance(d, bool) else str(d), "0", "-1", "1.5", "true", "none", "x"]
    return out


_OPTIONS = {name: _field_values(cls) for name, cls in registered_passes().items()}


@st.composite
def pipeline_text(draw) -> str:
    """Mostly well-formed pipelines of real passes and options, with a dose of damage."""
    items = []
    for _ in range(draw(st.integers(1, 5))):
        name = draw(st.one_of(st.sampled_from(_PASSES), st.sampled_from(_PASSES), st.sampled_from(list(RECIPES)),
                              st.text(max_size=8)))
        if draw(st.booleans()):
            known = _OPTIONS.get(name, {})
            opts = []
            for _ in range(draw(st.integers(0, 3))):
                if known and draw(st.integers(0, 3)):
                    key = draw(st.sampled_from(sorted(known)))
                    value = draw(st.one_of(st.sampled_from(known[key]), _VALUES))
                else:
                    key, value = draw(st.one_of(st.sampled_from(_KEYS), st.text(max_size=5))), draw(_VALUES)
                opts.append(f"{key}={value}")
            sep = draw(st.sampled_from([",", ",", ",", ", ", ",,", ";"]))
            name += "{" + sep.join(opts) + draw(st.sampled_from(["}", "}", "}", "", "}}"]))
        items.append(name)
    return draw(st.sampled_from([",", ",", ",", ", ", ",,", " "])).join(items)


_ANY_TEXT = st.one_of(pipeline_text(), st.text(alphabet="abcdeklmnopqrstuvwz-_{}=,.0123456789 |:/+", max_size=40),
                      st.text(max_size=40))


def _parse_roundtrip(text: str) -> None:
    p = parse_pipeline(text)
    again = parse_pipeline(str(p))
    assert str(again) == str(p), f"{text!r} printed as {str(p)!r} re-parses as {str(again)!r}"


@_settings(1500)
@given(text=_ANY_TEXT)
def test_fuzz_parse_pipeline(text):
    _run("parse_pipeline", _parse_roundtrip, text)


@_settings(1500)
@given(text=_ANY_TEXT)
def test_fuzz_pass_manager_from_pipeline(text):
    _run("PassManager.from_pipeline", lambda t: PassManager.from_pipeline(t, CompileContext()).check_order(), text)


# --- regressions: crashes the fuzzer found, now refused with ModelLoadError ---------------------

def _seed_proto():
    import onnx

    return onnx.load_from_string(SEED_MODEL)


def _write(proto, fuzz_dir: Path) -> Path:
    path = fuzz_dir / "regression.onnx"
    path.write_bytes(proto.SerializeToString())
    return path


def test_regression_op_type_not_utf8(fuzz_dir):
    proto = _seed_proto()
    raw = bytearray(proto.SerializeToString())
    i = raw.find(b"RMSNormalization")
    raw[i] = 0xFF  # the op type no longer decodes as UTF-8
    (fuzz_dir / "r.onnx").write_bytes(bytes(raw))
    with pytest.raises(lowbit.errors.ModelLoadError, match="not text"):
        lowbit.load_model(fuzz_dir / "r.onnx")


def test_regression_initializer_data_does_not_match_shape(fuzz_dir):
    proto = _seed_proto()
    init = next(t for t in proto.graph.initializer if t.name == "lm_head.weight")
    init.dims[1] = 40
    with pytest.raises(lowbit.errors.ModelLoadError, match="'lm_head.weight' .* does not hold matching data"):
        lowbit.load_model(_write(proto, fuzz_dir))


def test_regression_undefined_input(fuzz_dir):
    proto = _seed_proto()
    node = next(n for n in proto.graph.node if n.name == "layers.0.attn.v_proj")
    node.input[1] = "layers.0.attn.v_proj/weight"
    with pytest.raises(lowbit.errors.ModelLoadError, match="reads 'layers.0.attn.v_proj/weight', which no node"):
        lowbit.load_model(_write(proto, fuzz_dir))
