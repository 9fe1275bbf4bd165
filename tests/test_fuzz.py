"""Safe loading: hostile .scn files are clean FormatErrors, and nothing scn reads runs code.

A few hundred hypothesis cases over the mutators in tests/fuzz_mutators.py (which
scripts/fuzz_format.py runs by the thousand, writing docs/results/fuzz.json).
"""

import importlib.util
import json
import random
import re

import fuzz_mutators
import numpy as np
import pytest
from conftest import ROOT
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from scn import format as fmt
from scn.errors import DataError, FormatError

_spec = importlib.util.spec_from_file_location("fuzz_format", ROOT / "scripts" / "fuzz_format.py")
fuzz_format = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fuzz_format)

BASES = fuzz_mutators.base_files()
FAST = settings(max_examples=120, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


def _with_header(raw: bytes, edit) -> bytes:
    """`raw` with its scn header text edited by `edit` (str -> str), re-signed."""
    st_header, data = fuzz_mutators._split(raw)
    st_header["__metadata__"]["scn"] = edit(st_header["__metadata__"]["scn"])
    return fuzz_mutators._join(st_header, data)


@pytest.mark.parametrize("number", ["1e400", "-1e400", "Infinity", "NaN"])
def test_non_finite_header_numbers_are_refused_before_anything_is_built(case_path, number):
    bad = _with_header(BASES["mixed"], lambda text: re.sub(r'"scalars":\d+', f'"scalars":{number}', text))
    case_path.write_bytes(bad)
    with pytest.raises(FormatError, match="not valid JSON"):
        fmt.load(case_path)


@pytest.mark.parametrize("scalars", ["0", "-7"])
def test_a_size_reference_of_zero_is_refused(case_path, scalars):
    bad = _with_header(BASES["mixed"], lambda text: re.sub(r'"scalars":\d+', f'"scalars":{scalars}', text))
    case_path.write_bytes(bad)
    with pytest.raises(FormatError, match="positive integers"):
        fmt.load(case_path)


def test_out_of_range_exponents_and_non_finite_floats_are_refused():
    header, packed = fmt.parse(BASES["mixed"])
    rest = {k: v for k, v in header.items() if k not in ("layers", "floats")}
    live = packed.tensors["bits"] > 0
    exps = packed.tensors["exponents"].copy()
    exps[live.nonzero()[0][0]] = 127
    floats = packed.tensors["floats"].copy()
    floats[0] = float("nan")
    for tensors, match in (({"exponents": exps}, "exponent beyond"), ({"floats": floats}, "NaN")):
        raw = fmt.serialize(fmt.Packed({**packed.tensors, **tensors}, packed.layers, packed.floats), rest)
        with pytest.raises(FormatError, match=match):
            fmt.decode(fmt.parse(raw)[1])


def test_declared_sizes_are_bounded_by_the_file(case_path):
    """Huge declared layers, inputs, layer counts and headers are refused before anything of
    that size is allocated or computed."""
    header, packed = fmt.parse(BASES["mixed"])
    rest = {k: v for k, v in header.items() if k not in ("layers", "floats")}
    layers = [dict(entry) for entry in packed.layers]
    layers[0]["shape"] = [2**26] + [1] * (len(layers[0]["shape"]) - 1)
    layers[0]["live_inputs"] = 1
    codes = np.concatenate([packed.tensors["codes"], np.zeros(260_000, np.uint8)])
    big = fmt.serialize(fmt.Packed({**packed.tensors, "codes": codes}, layers, packed.floats), rest)
    with pytest.raises(FormatError, match="far more than"):
        fmt.parse(big)
    many = fmt.serialize(fmt.Packed(packed.tensors, packed.layers * 3_000, packed.floats), rest)
    with pytest.raises(FormatError, match="beyond the format's limits"):
        fmt.parse(many)
    c = rest["dataset"]["input_shape"][0]
    wide = _with_header(BASES["mixed"], lambda text: re.sub(r'"input_shape":\[[^]]*\]',
                                                            f'"input_shape":[{c},1182,1182]', text))
    case_path.write_bytes(wide)
    with pytest.raises(FormatError, match="do not make a working model"):
        fmt.load(case_path)  # the check runs on the meta device: no 1182x1182 convolution
    huge = (1 << 40).to_bytes(8, "little") + BASES["mixed"][8:]  # still starts with "{"
    with pytest.raises(FormatError, match="declares a header of"):
        fmt.parse(huge)


def test_a_synthetic_dataset_named_by_a_file_stays_small(tmp_path, capsys):
    from scn import eval_cli

    info = {"name": "synthetic", "input_shape": [1, 28, 28], "classes": ["c"] * 100_000}
    with pytest.raises(DataError, match="beyond what scn-eval generates"):
        eval_cli.load_dataset("synthetic", {"dataset": info})
    with pytest.raises(DataError, match="beyond what scn-eval generates"):
        eval_cli.load_dataset("synthetic", {"dataset": {**info, "classes": ["a", "b"],
                                                        "input_shape": [3, 1000, 1000]}})


@pytest.fixture(scope="module")
def case_path(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz") / "case.scn"


def clean(raw, path):
    outcome, detail = fuzz_format.run_case(raw, path, time_limit=10)
    assert outcome in ("ok", "format_error"), detail


def test_base_files_load(case_path):
    for name, raw in BASES.items():
        assert fuzz_format.run_case(raw, case_path) == ("ok", ""), name


@FAST
@given(st.binary(max_size=4096))
def test_random_bytes(case_path, raw):
    clean(raw, case_path)


@FAST
@given(st.sampled_from(sorted(BASES)), st.integers(0, 10**9), st.data())
def test_truncated_and_flipped(case_path, base, seed, data):
    raw = BASES[base]
    rng = random.Random(seed)
    cut = data.draw(st.integers(0, len(raw) - 1))
    clean(raw[:cut], case_path)
    clean(fuzz_mutators.bit_flips(rng, raw), case_path)


@settings(FAST, max_examples=300)
@given(st.sampled_from(sorted(BASES)),
       st.sampled_from(["header_field", "tensor_values", "safetensors_table", "raw_resigned"]),
       st.integers(0, 10**9))
def test_resigned_mutations(case_path, base, category, seed):
    """Damage behind a valid checksum: the decoder's own checks must catch it."""
    clean(fuzz_mutators.MUTATORS[category](random.Random(seed), BASES[base]), case_path)


def test_absurd_shapes_are_refused_before_allocating(tmp_path):
    header, packed = fmt.parse(BASES["mixed"])
    rest = {k: v for k, v in header.items() if k not in ("layers", "floats")}
    for shape in ([1, 2**28, 1, 1], [2**20, 2**20], [-4, 3, 3, 3], [4, 4, 4]):
        layers = [dict(packed.layers[0], shape=shape)] + packed.layers[1:]
        bad = fmt.serialize(fmt.Packed(packed.tensors, layers, packed.floats), rest)
        with pytest.raises(FormatError, match="malformed"):
            fmt.parse(bad)
    for width in (10**6, 10**12):  # a model far larger than the file: refused on the meta device
        model = dict(rest["model"], kwargs=dict(rest["model"]["kwargs"], width=width))
        (tmp_path / "big.scn").write_bytes(fmt.serialize(packed, {**rest, "model": model}))
        with pytest.raises(FormatError, match="far more than the file can hold|can build|cannot build"):
            fmt.load(tmp_path / "big.scn")


def test_bit_depths_above_16_and_recursion_bombs(case_path):
    header, packed = fmt.parse(BASES["mixed"])
    rest = {k: v for k, v in header.items() if k not in ("layers", "floats")}
    bits = packed.tensors["bits"].copy()
    bits[0] = 17
    bad = fmt.serialize(fmt.Packed({**packed.tensors, "bits": bits}, packed.layers, packed.floats), rest)
    with pytest.raises(FormatError):
        fmt.decode(fmt.parse(bad)[1])
    st_header, data = fuzz_mutators._split(BASES["mixed"])
    meta = st_header["__metadata__"]
    meta["scn"] = '{"x":' + "[" * 100_000 + "]" * 100_000 + "," + meta["scn"][1:]
    with pytest.raises(FormatError, match="not valid JSON"):
        fmt.parse(fuzz_mutators._join(st_header, data))


@pytest.fixture(scope="module")
def training_files(tmp_path_factory):
    """A run folder's model.safetensors and training checkpoint, from a 3-step run."""
    from scn import experiment, resume
    from scn.cli import build_experiment
    from scn.sweep import compose_config

    out = tmp_path_factory.mktemp("run")
    exp = build_experiment(compose_config(["dataset=synthetic", "trainer.max_steps=3",
                                           "model.width=4", "trainer.progress=false"]))
    experiment.run(exp, out)
    return out / "model.safetensors", resume.path_in(out)


@settings(FAST, max_examples=60)
@given(st.integers(0, 10**9))
def test_damaged_training_files_are_format_errors(training_files, seed):
    from scn import checkpoint, resume

    model_file, state_file = training_files
    rng = random.Random(seed)
    for path, load in ((model_file, checkpoint.load_checkpoint),
                       (state_file, lambda p: resume.build_model(resume.load(p)))):
        raw = path.read_bytes()
        mutate = rng.choice([fuzz_mutators.truncate, fuzz_mutators.bit_flips, fuzz_mutators.splice])
        damaged = mutate(rng, raw)
        bad = path.with_name("damaged.safetensors")
        bad.write_bytes(damaged)
        try:
            load(bad)
        except FormatError:
            pass
    state = resume.load(state_file)  # and the intact one loads, its checksum verified
    assert state.step == 3


def test_non_finite_values_in_a_model_checkpoint_are_refused(training_files, tmp_path):
    from safetensors.torch import load as st_load
    from safetensors.torch import save as st_save

    from scn import checkpoint, container

    model_file, _ = training_files
    header, raw = container.read(model_file, checkpoint.CHECKPOINT_FORMAT, checkpoint.CHECKPOINT_VERSION)
    state = st_load(raw)
    key = next(k for k in state if k.endswith("running_var"))
    state[key][0] = float("nan")
    bad = tmp_path / "nan.safetensors"
    bad.write_bytes(container.write(st_save, state, header))
    with pytest.raises(FormatError, match=f"NaN or infinite values in {key}"):
        checkpoint.load_checkpoint(bad)


def test_fuzz_results_file_has_the_projects_shape():
    path = ROOT / "docs" / "results" / "fuzz.json"
    if not path.exists():
        pytest.skip("docs/results/fuzz.json not generated yet (python scripts/fuzz_format.py)")
    result = json.loads(path.read_text())
    assert {"command", "machine", "cases", "crashes", "hangs", "results"} <= set(result)
    assert result["cases"] >= 10_000 and result["crashes"] == 0 and result["hangs"] == 0
    assert sum(r["cases"] for r in result["results"]) == result["cases"]


def test_nothing_scn_reads_can_run_code():
    """No pickle anywhere: torch.load only with weights_only=True, numpy without pickles."""
    for path in [*(ROOT / "scn").rglob("*.py"), *(ROOT / "scripts").glob("*.py")]:
        text = path.read_text()
        assert not re.search(r"^\s*(import pickle|from pickle|import dill|import cloudpickle)",
                             text, re.M), path
        for call in re.findall(r"torch\.load\([^)]*\)", text):
            assert "weights_only=True" in call, (path, call)
        assert "allow_pickle=True" not in text, path
        assert not re.search(r"yaml\.load\((?![^)]*SafeLoader)", text), path
        assert not re.search(r"(?<![\w.])eval\(", text), path
