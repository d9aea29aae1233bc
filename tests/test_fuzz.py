"""Property-based fuzzing (Hypothesis) of what users hand clsim: the command line's option space, and
corrupted data, checkpoint and summary files. For any input, a run exits 0 with a complete run
directory whose config records the values given, or exits 2 with one `error:` line and nothing lost;
a data reader returns exactly the stored values or refuses them in one line; the report skips a bad
summary with a warning. Never a traceback, never a silent conversion.

The default tier tries a few examples of each property (seconds); the slow tier many more.
"""
from __future__ import annotations

import csv
import dataclasses
import gzip
import json
import math
import os
import pickle
import shutil
import struct
import tempfile
import typing
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings, strategies as st

from clsim import cli, config, data, rundir
from clsim.errors import UserError
from clsim.privacy.audit import AuditOptions
from clsim.registry import MECHANISMS, SCENARIOS, STRATEGIES
from clsim.report import write_report

BASE = ["--n-tasks", "2", "--epochs", "1", "--hidden", "8", "--progress", "false", "--loggers", "jsonl"]
#: stderr lines a run may print besides its one error
INFO = ("warning: ", "note: ", "privacy: ", "speed: ")
#: options left out: where files go and how progress shows (fixed above), torch.compile (minutes) and
#: data-parallel workers (processes, a Ray cluster: tests/test_faults.py tries a bad --address)
FIXED = {"out", "data_root", "progress", "compile", "scenario", "strategy", "privacy", "loggers",
         "workers", "address"}
#: the largest valid value tried for options whose cost grows with them (the rest: low .. low + 2)
CAPS = {"epochs": 2, "n_tasks": 3, "hidden": 16, "fisher_samples": 40, "mas_samples": 40,
        "blip_fisher_samples": 40, "replay_size": 60, "gem_memory": 60, "gdumb_memory": 60, "icarl_memory": 60,
        "agem_batch": 32, "dplis_k": 2, "audit_examples": 40, "audit_canaries": 5, "audit_guesses": 3}
FLOOR = {"batch_size": 16}   # batches of one example are a few thousand steps
SUPERVISED = [e.name for e in STRATEGIES.entries() if "supervised" in e.target.learners]


def tiers(n: int, slow_n: int):
    """`examples`: `n` in the default tier, `slow_n` in the slow one."""
    return pytest.mark.parametrize("examples", [pytest.param(n, id="quick"),
                                                pytest.param(slow_n, id="long", marks=pytest.mark.slow)])


def fuzz(examples: int):
    """Hypothesis settings: both tiers draw the same examples on every run, so CI never fails on a
    draw no earlier run made; CLSIM_FUZZ_EXPLORE=1 draws new ones each time (hunting, not gating)."""
    return settings(max_examples=examples, derandomize=not os.environ.get("CLSIM_FUZZ_EXPLORE"),
                    deadline=None, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                           HealthCheck.data_too_large])


# ------------------------------------------------------------------ the command line

GARBAGE = st.sampled_from(["", " ", "abc", "1.5", "1e3", "nan", "inf", "-inf", "-1", "0", str(2 ** 63),
                           "99999999999999999999999", "0x10", "1_0", "ü", "--epochs", "true", "[1]"])


def value_text(field: dataclasses.Field, kind: type) -> st.SearchStrategy[str]:
    """Text for one flag: often valid (small, so that a run stays short), often not."""
    meta, name = field.metadata, field.name
    if meta.get("choices"):
        valid = st.sampled_from([str(c) for c in meta["choices"]])
    elif kind is bool:
        valid = st.sampled_from(["true", "false", "yes", "no", "1", "0", "on", "off"])
    elif kind is int:
        low = max(int(meta["low"]) if meta.get("low") is not None else 0, FLOOR.get(name, 0))
        high = min(int(meta["high"]) if meta.get("high") is not None else low + 2, CAPS.get(name, low + 2))
        valid = st.integers(low, max(low, high)).map(str)
    elif kind is float:
        low = meta["low"] if meta.get("low") is not None else -1.0
        high = meta["high"] if meta.get("high") is not None else low + (0.2 if name == "lr" else 2.0)
        valid = st.floats(low, high, exclude_min=bool(meta.get("low_open")), allow_nan=False).map(repr)
    else:
        valid = st.sampled_from({"device": ["cpu"], "lr_milestones": ["", "1", "1,2"]}.get(name, ["x"]))
    bad = [GARBAGE]
    if kind in (int, float) and meta.get("low") is not None:
        bad.append(st.just(str(meta["low"] - 1)))
    if kind in (int, float) and meta.get("high") is not None:
        bad.append(st.just(str(meta["high"] + 1)))
    if name == "device":
        bad.append(st.sampled_from(["cuda:7", "tpu", "cpu:x", "meta"]))
    return st.one_of(valid, valid, *bad)


def option_fields(strategy: str, privacy: str | None) -> list[tuple[dataclasses.Field, type]]:
    classes = [config.RunOptions, config.ProtocolOptions, AuditOptions, SCENARIOS.get("split_digits").options,
               STRATEGIES.get(strategy).target.Options]
    mechanism = privacy or STRATEGIES.get(strategy).target.privacy
    if mechanism in MECHANISMS.names():
        classes.append(MECHANISMS.get(mechanism).options)
    out = []
    for cls in filter(None, classes):
        hints = typing.get_type_hints(cls)
        out += [(f, config._scalar_type(hints[f.name])) for f in dataclasses.fields(cls) if f.name not in FIXED]
    return out


@st.composite
def command_lines(draw) -> tuple[list[str], dict[str, tuple[type, str]]]:
    """argv (past BASE) and what it asks for: option name -> (type, text) of the last value given."""
    strategy = draw(st.sampled_from(SUPERVISED + ["nope"]))
    privacy = draw(st.sampled_from([None, None, "dpsgd", "dplis", "nope"]))
    argv = ["--strategy", strategy] + ([] if privacy is None else ["--privacy", privacy])
    if strategy not in STRATEGIES.names() or (privacy is not None and privacy not in MECHANISMS.names()):
        return argv, {}
    fields = option_fields(strategy, privacy)
    chosen = draw(st.lists(st.sampled_from(range(len(fields))), max_size=5, unique=True))
    asked = {}
    for i in chosen:
        field, kind = fields[i]
        text = draw(value_text(field, kind))
        argv += [config.flag(field.name), text]
        asked[field.name] = (kind, text)
    if draw(st.booleans()) and draw(st.booleans()):   # now and then a flag that does not exist
        argv += ["--" + draw(st.sampled_from(["bogus", "lr-rate", "epoch", "seeds"])), "1"]
    return argv, asked


def parsed(kind: type, text: str):
    return config.parse_bool(text) if kind is bool else kind(text)


def check_run(argv: list[str], asked: dict, capsys) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "o"
        code = cli.main([*BASE, *argv, "--out", str(out)])
        captured = capsys.readouterr()
        assert "Traceback" not in captured.err, captured.err
        errors = [line for line in captured.err.splitlines() if line.startswith("error: ")]
        others = [line for line in captured.err.splitlines()
                  if not line.startswith(("error: ", *INFO)) and line.strip()]
        assert others == [], captured.err
        made = sorted(out.iterdir()) if out.exists() else []
        if code == 0:
            assert errors == [] and len(made) == 1 and not made[0].name.startswith("."), made
            assert {"summary.json", "config.json"} <= {p.name for p in made[0].iterdir()}
            saved = json.loads((made[0] / "config.json").read_text())
            for name, (kind, text) in asked.items():   # what was given is what ran: no silent conversion
                recorded = next(group[name] for group in (saved["run"], saved["audit"], saved) if name in group)
                assert recorded == parsed(kind, text), (name, text, recorded)
            summary = json.loads((made[0] / "summary.json").read_text())
            assert len(summary["accuracy_matrix"]) == saved["n_tasks"]
        else:
            assert code == 2 and len(errors) == 1, (code, captured.err)
            # nothing half-written: no directory, or a run kept after a finished task, named in the line
            assert all(p.name.startswith(".") and str(p) in errors[0] for p in made), (made, errors)


@tiers(4, 150)
def test_any_command_line_is_a_complete_run_or_one_line(examples, capsys):
    @fuzz(examples)
    @given(command_lines())
    def check(case):
        capsys.readouterr()
        check_run(*case, capsys)
    check()


# ------------------------------------------------------------------ data files

def idx_bytes(array: np.ndarray, code: int) -> bytes:
    return struct.pack(">HBB", 0, code, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


IDX_CODES = {0x08: np.dtype(np.uint8), 0x09: np.dtype(np.int8), 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
             0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


@st.composite
def mnist_files(draw):
    """Four IDX files: of any declared type and values, some with their bytes mutated."""
    files = {}
    for prefix, n in (("train", 6), ("t10k", 4)):
        for kind, shape, top in (("images", (n, 28, 28), 300), ("labels", (n,), 12)):
            code = draw(st.sampled_from([0x08] * 4 + list(IDX_CODES)))
            values = draw(st.sampled_from(["fit", "wide", "fraction"]))
            rng = np.random.default_rng(draw(st.integers(0, 2 ** 16)))
            array = rng.integers(0, 10 if kind == "labels" else 256, shape) if values == "fit" else \
                rng.integers(-2, top, shape) if values == "wide" else rng.random(shape) * 9
            raw = bytearray(idx_bytes(np.asarray(array).astype(IDX_CODES[code]), code))
            for _ in range(draw(st.integers(0, 2)) if draw(st.booleans()) else 0):   # byte flips, cuts
                at = draw(st.integers(0, len(raw) - 1))
                if draw(st.booleans()):
                    raw[at] ^= draw(st.integers(1, 255))
                else:
                    del raw[at:]
                    break
            files[f"{prefix}-{kind}-idx{len(shape)}-ubyte.gz"] = bytes(raw)
    return files


@tiers(25, 400)
def test_any_mnist_file_is_read_exactly_or_refused_in_one_line(examples):
    @fuzz(examples)
    @given(mnist_files())
    def check(files):
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            for name, raw in files.items():
                with gzip.open(root / name, "wb") as f:
                    f.write(raw)
            try:
                x_train, y_train, x_test, y_test = data.load_mnist(root)
            except UserError as exc:
                assert "\n" not in str(exc) and "MNIST" in str(exc) or "IDX" in str(exc), exc
                return
            for prefix, x, y in (("train", x_train, y_train), ("t10k", x_test, y_test)):
                stored_x = data.read_idx(root / f"{prefix}-images-idx3-ubyte.gz")
                stored_y = data.read_idx(root / f"{prefix}-labels-idx1-ubyte.gz")
                assert stored_x.dtype.kind in "iu" and stored_y.dtype.kind in "iu"   # never a float cast
                assert torch.equal(torch.round(x.squeeze(1) * 255).long(), torch.from_numpy(stored_x.astype(np.int64)))
                assert torch.equal(y, torch.from_numpy(stored_y.astype(np.int64)))
                assert int(y.min()) >= 0 and int(y.max()) <= 9
    check()


@st.composite
def cifar_batches(draw):
    n = draw(st.integers(0, 3))
    dtype = draw(st.sampled_from([np.uint8, np.uint8, np.int64, np.int16, np.float32, np.float64, np.bool_]))
    pixels = draw(st.sampled_from(["fit", "wide", "unit"]))
    rng = np.random.default_rng(draw(st.integers(0, 2 ** 16)))
    values = rng.integers(0, 256, (n, 3072)) if pixels == "fit" else rng.integers(-5, 600, (n, 3072)) \
        if pixels == "wide" else rng.random((n, 3072))
    width = draw(st.sampled_from([3072, 3072, 3071, 1024]))
    labels = draw(st.one_of(
        st.lists(st.integers(-3, 12), min_size=n, max_size=n),
        st.lists(st.one_of(st.integers(0, 9), st.floats(0, 9), st.booleans(), st.text(max_size=1)),
                 min_size=n, max_size=n),
        st.just(np.arange(n) % 10), st.just(np.arange(n, dtype=np.float64))))
    return {b"data": values.astype(dtype)[:, :width], b"labels": labels}


@tiers(40, 600)
def test_any_cifar_batch_is_read_exactly_or_refused_in_one_line(examples):
    @fuzz(examples)
    @given(cifar_batches())
    def check(batch):
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "data_batch_1"
            path.write_bytes(pickle.dumps({**batch, b"batch_label": b"x"}, protocol=2))
            try:
                x, y = data._read_cifar_batch(path)
            except UserError as exc:
                assert "\n" not in str(exc) and str(path) in str(exc), exc
                return
            assert np.array_equal(x.astype(np.int64), np.asarray(batch[b"data"]).astype(np.int64))   # exactly
            assert np.asarray(batch[b"data"]).dtype.kind in "iu" and x.dtype == np.uint8
            assert y.tolist() == [int(v) for v in batch[b"labels"]] and \
                all(type(v) is int or isinstance(v, np.integer) for v in batch[b"labels"])
    check()


# ------------------------------------------------------------------ checkpoints

@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run")
    assert cli.main([*BASE, "--out", str(out)]) == 0
    (run,) = out.iterdir()
    return run


def leaves(value, path=()):
    """Every (path, leaf) of a checkpoint's nested dicts and lists."""
    if isinstance(value, dict):
        for k, v in value.items():
            yield from leaves(v, (*path, k))
    elif isinstance(value, (list, tuple)) and not isinstance(value, str):
        for i, v in enumerate(value):
            yield from leaves(v, (*path, i))
    else:
        yield path, value


def set_at(state, path, new):
    *up, last = path
    for key in up:
        state = state[key]
    if isinstance(state, tuple):
        raise TypeError("tuples stay")
    if new is KeyError:
        del state[last]
    else:
        state[last] = new


REPLACEMENTS = st.one_of(st.just(KeyError), st.none(), st.integers(-10 ** 30, 10 ** 30), st.floats(),
                         st.text(max_size=3), st.just([]), st.just({}), st.just(torch.zeros(2)),
                         st.just(torch.tensor(float("nan"))))


@tiers(6, 200)
def test_any_damaged_checkpoint_resumes_completely_or_is_one_line_and_loses_nothing(examples, finished_run, capsys):
    """Edits to a checkpoint's contents, sealed with a matching digest as a forger (or a bug) would, and
    bit flips or cuts that are not: resumed to a complete run, or refused in one line with every file
    of the interrupted run as it was."""
    state = torch.load(finished_run / "checkpoint.pt", weights_only=True)
    # sealed edits reach what the engine and the run directory read and check; a strategy's and
    # the ledger's own state is only as checked as their load_state_dict (not field by field)
    paths = [p for p, _ in leaves(state) if p[0] in ("progress", "model", "rng", "config", "logger_files")]
    paths += [(key,) for key in state if key != "digest"]

    @fuzz(examples)
    @given(st.data())
    def check(draw):
        capsys.readouterr()   # what an earlier, failing example left
        with tempfile.TemporaryDirectory() as tmp:
            partial = Path(tmp) / f".{finished_run.name}.partial"
            shutil.copytree(finished_run, partial)
            (partial / "summary.json").unlink()
            sealed = draw.draw(st.booleans())
            if sealed:
                edited = torch.load(partial / "checkpoint.pt", weights_only=True)
                edited.pop("digest")
                path = draw.draw(st.sampled_from(paths))
                try:
                    set_at(edited, path, draw.draw(REPLACEMENTS))
                except (TypeError, KeyError, IndexError):
                    return
                torch.save({**edited, "digest": rundir.digest(edited)}, partial / "checkpoint.pt")
            else:
                raw = bytearray((partial / "checkpoint.pt").read_bytes())
                at = draw.draw(st.integers(0, len(raw) - 1))
                if draw.draw(st.booleans()):
                    raw[at] ^= draw.draw(st.integers(1, 255))
                else:
                    del raw[at:]
                (partial / "checkpoint.pt").write_bytes(bytes(raw))
            before = {p.name: p.read_bytes() for p in partial.iterdir()}
            code = cli.main(["--resume", str(partial)])
            err = capsys.readouterr().err
            assert "Traceback" not in err, err
            if code == 0:
                done = partial.parent / finished_run.name
                assert not partial.exists() and (done / "summary.json").is_file()
                summary = json.loads((done / "summary.json").read_text())
                reference = json.loads((finished_run / "summary.json").read_text())
                if not sealed:   # damage that no digest covers never changes a figure
                    assert summary["accuracy_matrix"] == reference["accuracy_matrix"]
            else:
                errors = [line for line in err.splitlines() if line.startswith("error: ")]
                assert code == 2 and len(errors) == 1, err
                assert {p.name: p.read_bytes() for p in partial.iterdir()} == before
    check()


@pytest.mark.parametrize("index", [2, 3])
def test_a_sealed_numpy_rng_field_past_a_c_int_is_one_line(index, finished_run, tmp_path, capsys):
    """An explore-tier find: numpy's set_state raised OverflowError (not a ValueError) for the
    position or has_gauss 2147483648.0, a traceback."""
    partial = tmp_path / f".{finished_run.name}.partial"
    shutil.copytree(finished_run, partial)
    (partial / "summary.json").unlink()
    edited = torch.load(partial / "checkpoint.pt", weights_only=True)
    edited.pop("digest")
    edited["rng"]["numpy"][index] = 2147483648.0
    torch.save({**edited, "digest": rundir.digest(edited)}, partial / "checkpoint.pt")
    before = {p.name: p.read_bytes() for p in partial.iterdir()}
    capsys.readouterr()
    assert cli.main(["--resume", str(partial)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len([line for line in err.splitlines() if line.startswith("error: ")]) == 1
    assert {p.name: p.read_bytes() for p in partial.iterdir()} == before


# ------------------------------------------------------------------ summaries

@st.composite
def damaged_summaries(draw, summary: dict):
    s = json.loads(json.dumps(summary))
    for _ in range(draw(st.integers(1, 3))):
        paths = [p for p, _ in leaves(s)]
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        new = draw(st.one_of(st.just(KeyError), st.none(), st.integers(-10 ** 20, 10 ** 20),
                             st.floats(allow_nan=False), st.text(max_size=3), st.just([]), st.just({}),
                             st.just([[1, 2], [3]])))
        try:
            set_at(s, path, new)
        except (TypeError, KeyError, IndexError):
            pass
    return s


@tiers(2, 60)
def test_a_report_over_any_damaged_summary_skips_it_or_uses_it(examples, finished_run, capsys):
    summary = json.loads((finished_run / "summary.json").read_text())

    @fuzz(examples)
    @given(damaged_summaries(summary))
    @example({**summary, "scenario": "\x1e"})   # an explore find: a record separator in a name
    def check(damaged):
        capsys.readouterr()
        with tempfile.TemporaryDirectory() as tmp:
            runs = Path(tmp) / "runs"
            shutil.copytree(finished_run, runs / "good")
            (runs / "bad").mkdir()
            shutil.copy(finished_run / "log.jsonl", runs / "bad" / "log.jsonl")
            (runs / "bad" / "summary.json").write_text(json.dumps(damaged))
            write_report([str(runs)], Path(tmp) / "report")
            err = capsys.readouterr().err
            with open(Path(tmp) / "report" / "results.csv", newline="") as f:   # CSV rows, not str.splitlines():
                rows = list(csv.reader(f))   # that also splits at \x1c-\x1e, \x85... inside a damaged name
            skipped = f"warning: skipped {runs / 'bad' / 'summary.json'}: " in err
            assert len(rows) == (2 if skipped else 3), err   # a header, then one row per run used
            assert all(line.startswith("warning: ") for line in err.splitlines()), err
            if not skipped:   # used: every headline figure it has is a number the table shows
                assert all(math.isfinite(damaged[k]) for k in ("acc", "bwt", "fwt", "forgetting"))
    check()
