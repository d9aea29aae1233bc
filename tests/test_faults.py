"""Fault injection with real processes and real files: kills at random points, a file-size limit, a
torn log, two runs into one directory, hostile pickles and checkpoints, misread flags and YAML.
Whatever happens, a user mistake is one line and exit 2, and nothing a run wrote is lost."""
from __future__ import annotations

import errno
import gzip
import json
import math
import os
import pickle
import random
import re
import resource
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from clsim import Experiment, cli, data, rundir
from clsim.errors import UserError
from conftest import REPO

# Small and quick: 5 tasks x 3 epochs x ~8 steps of a narrow MLP: a 31 kB checkpoint, 45 kB of TensorBoard events.
ARGS = ["--epochs", "3", "--hidden", "20", "--seed", "1", "--progress", "false"]
NAME = "split_digits-naive-class_il-seed1"
FIGURES = ("accuracy_matrix", "initial_scores", "acc", "bwt", "fwt", "forgetting", "task_aware", "steps", "examples_seen")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


pytestmark = pytest.mark.usefixtures("one_thread")   # tests/conftest.py


def child(*args: str, limit_bytes: int | None = None) -> subprocess.Popen:
    def setup():
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        if limit_bytes is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))
    return subprocess.Popen([sys.executable, str(REPO / "run_scenario.py"), *args], cwd=REPO, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=setup)


def one_line_error(stderr: str, *expected: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in stderr, stderr
    for text in expected:
        assert text in lines[0], lines[0]
    return lines[0]


def log_records(run_dir: Path) -> list[tuple]:
    """What a log says, less wall-clock figures: every line must parse (no torn or doubled lines)."""
    out = []
    for line in (run_dir / "log.jsonl").read_text().splitlines():
        r = json.loads(line)
        out.append((r["kind"], r["step"], r.get("task"), r.get("loss"), r.get("acc")))
    return out


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run every faulty one must reproduce."""
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("reference")
    run_dir = cli.from_argv([*ARGS, "--out", str(out)]).run().run_dir
    assert run_dir.name == NAME
    return json.loads((run_dir / "summary.json").read_text()), log_records(run_dir)


def resume_and_compare(partial: Path, reference) -> None:
    run_dir, _ = cli.resume([str(partial)])
    assert not partial.exists() and run_dir.name == NAME
    summary, log = reference
    resumed = json.loads((run_dir / "summary.json").read_text())
    for key in FIGURES:
        assert resumed[key] == summary[key], key
    assert log_records(run_dir) == log   # every step and task record once, in order
    assert (run_dir / "config.json").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_killed_at_a_random_point_then_resumed_gives_the_uninterrupted_figures_and_log(tmp_path, seed, reference):
    """Seed 0 kills (SIGKILL) just after a task's record reached the log, before its checkpoint: the
    log and the checkpoint must still agree; seed 1 kills at a random time after the first
    checkpoint; seed 2 sends SIGTERM then, which is handled as Ctrl-C is. Odd seeds also leave a
    torn last line in the log, as a kill during a write would."""
    rng = random.Random(seed)
    out = tmp_path / "out"
    partial = out / f".{NAME}.partial"
    proc = child(*ARGS, "--out", str(out))
    wanted_tasks = rng.randint(2, 4)
    while proc.poll() is None:
        if seed == 0:
            log = partial / "log.jsonl"
            if log.is_file() and log.read_text().count('"kind": "task"') >= wanted_tasks:
                break
        elif (partial / "checkpoint.pt").is_file():
            time.sleep(rng.uniform(0.0, 1.5))
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGTERM if seed == 2 else signal.SIGKILL)
    _, err = proc.communicate(timeout=60)
    if not partial.exists():   # it finished before the signal
        pytest.skip("the run ended before the kill point on this machine")
    if seed == 2:
        assert proc.returncode == 143 and err.strip() == f"interrupted; continue with: {rundir.RESUME} {partial}"
    if seed % 2:
        with open(partial / "log.jsonl", "a") as f:
            f.write('{"kind": "step", "step": 99')
    resume_and_compare(partial, reference)


@pytest.mark.slow
def test_a_file_size_limit_is_one_line_and_the_last_checkpoint_resumes(tmp_path, reference):
    """`ulimit -f` below what the run writes (TensorBoard's events outgrow it in a later task)."""
    out = tmp_path / "out"
    partial = out / f".{NAME}.partial"
    proc = child(*ARGS, "--out", str(out), limit_bytes=38_000)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 2
    line = one_line_error(err, "file-size limit was reached (EFBIG) while writing", str(partial),
                          f"continue with: {rundir.RESUME} {partial}")
    assert str(partial / "tb") in line   # the file that hit the limit
    assert (partial / "checkpoint.pt").is_file()
    resume_and_compare(partial, reference)


@pytest.mark.slow
def test_two_runs_into_one_directory_each_get_their_own(tmp_path):
    out = tmp_path / "out"
    args = ["--n-tasks", "2", "--epochs", "1", "--hidden", "20", "--checkpoint", "false", "--progress", "false"]
    procs = [child(*args, "--out", str(out)) for _ in range(2)]
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
    name = "split_digits-naive-class_il-seed0"
    assert sorted(p.name for p in out.iterdir()) == [name, name + "-2"]
    summaries = [json.loads((out / n / "summary.json").read_text()) for n in (name, name + "-2")]
    assert all((out / n / "config.json").is_file() for n in (name, name + "-2"))
    assert summaries[0]["accuracy_matrix"] == summaries[1]["accuracy_matrix"]


def test_a_rerun_keeps_the_interrupted_run_and_a_running_one_is_not_taken_over(tmp_path, capsys):
    interrupted = tmp_path / f".{NAME}.partial"
    interrupted.mkdir()
    (interrupted / "checkpoint.pt").write_bytes(b"kept")
    again = rundir.RunDirectory.claim(str(tmp_path), NAME)
    assert again.path.name == f".{NAME}-2.partial" and (interrupted / "checkpoint.pt").read_bytes() == b"kept"
    assert f"{rundir.RESUME} {interrupted}" in capsys.readouterr().err
    with pytest.raises(UserError, match="in use by another running clsim process"):
        rundir.RunDirectory.reopen(again.path)   # flock: a second resume of a live run is refused
    again.close()
    rundir.RunDirectory.reopen(again.path).close()   # once its owner is gone it can be taken over


class Payload:
    """Pickles to a call of os.system that creates a marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_malicious_cifar_batch_is_refused_and_never_runs(tmp_path, capsys):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    marker = tmp_path / "pwned"
    good = {b"batch_label": b"x", b"labels": [1, 2], b"data": np.zeros((2, 3072), np.uint8),
            b"filenames": [b"a", b"b"]}
    for protocol in (2, 4):   # the official files are protocol 2, our generator writes 4
        (folder / "test_batch").write_bytes(pickle.dumps(good, protocol=protocol))
        x, y = data._read_cifar_batch(folder / "test_batch")
        assert x.shape == (2, 3072) and y.tolist() == [1, 2]
    (folder / "data_batch_1").write_bytes(pickle.dumps({**good, b"labels": Payload(marker)}, protocol=2))
    assert cli.main(["--scenario", "split_cifar", "--data-root", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    one_line_error(capsys.readouterr().err, "refused CIFAR-10 file", "posix.system")
    assert not marker.exists() and not (tmp_path / "o").exists()


def test_a_malicious_checkpoint_is_refused_and_never_runs(tmp_path, capsys):
    marker = tmp_path / "pwned"
    partial = tmp_path / f".{NAME}.partial"
    partial.mkdir()
    (partial / "config.json").write_text(json.dumps({"argv": [*ARGS, "--out", str(tmp_path)]}))
    (partial / "log.jsonl").write_text("")
    torch.save({"step": 1, "logger_files": {}, "model": Payload(marker)}, partial / "checkpoint.pt")
    assert cli.main(["--resume", str(partial)]) == 2
    one_line_error(capsys.readouterr().err, f"{partial / 'checkpoint.pt'} is not a clsim checkpoint")
    assert not marker.exists() and (partial / "checkpoint.pt").is_file()


def test_a_checkpoint_that_is_not_a_dict_is_one_line(tmp_path, capsys):
    partial = tmp_path / f".{NAME}.partial"
    partial.mkdir()
    (partial / "config.json").write_text(json.dumps({"argv": [*ARGS, "--out", str(tmp_path)]}))
    torch.save([1, 2], partial / "checkpoint.pt")
    assert cli.main(["--resume", str(partial)]) == 2
    one_line_error(capsys.readouterr().err, "holds a list, not a dict")
    assert partial.is_dir()


@pytest.mark.slow
@pytest.mark.parametrize("strategy", cli.STRATEGIES.names())
def test_every_strategy_checkpoint_loads_without_running_code(tmp_path, strategy):
    """weights_only=True admits tensors and plain data only: each strategy's state must be that."""
    entry = cli.STRATEGIES.get(strategy)
    if "supervised" not in entry.target.learners:
        pytest.skip(f"{strategy} is for RL learners")
    setting = entry.target.settings[0]
    run_dir = Experiment(strategy=strategy, setting=setting, n_tasks=2, epochs=1, hidden=20, progress=False,
                         out=str(tmp_path)).run().run_dir
    state = rundir._load(run_dir / "checkpoint.pt")
    assert state["progress"]["step"] > 0 and len(state["progress"]["matrix"]) == 2


def test_a_private_run_checkpoint_loads_without_running_code(tmp_path):
    run_dir = Experiment(privacy="dpsgd", n_tasks=2, epochs=1, hidden=20, progress=False,
                         out=str(tmp_path)).run().run_dir
    state = rundir._load(run_dir / "checkpoint.pt")
    assert state["ledger"]["accesses"]


def privacy_flags() -> list[str]:
    from clsim.privacy.dpsgd import DPOptions
    import dataclasses
    return ["--privacy"] + [cli.config.flag(f.name) for f in dataclasses.fields(DPOptions)]


def test_every_abbreviation_of_a_privacy_flag_is_refused():
    flags = privacy_flags()
    whole = set(flags)
    tried = 0
    for name in flags:
        for cut in range(3, len(name)):
            prefix = name[:cut]
            if prefix in whole:
                continue
            with pytest.raises(UserError, match=re.escape(f"unknown option(s) {prefix} ")):
                cli.from_argv(["--privacy", "dpsgd", prefix, "1"] if name != "--privacy" else [prefix, "dpsgd"])
            tried += 1
    assert tried > 50
    with pytest.raises(UserError, match=re.escape("unknown option(s) --lis ")):
        cli.from_argv(["--lis"])


@pytest.mark.slow
def test_an_abbreviated_flag_in_a_real_process_is_one_line_and_writes_nothing(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "run_scenario.py"), "--priv", "dpsgd", "--out",
                           str(tmp_path / "o")], cwd=REPO, env=ENV, capture_output=True, text=True)
    assert proc.returncode == 2
    one_line_error(proc.stderr, "unknown option(s) --priv for scenario split_digits")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("args,expected", [
    (["--privacy", "dplis", "--privacy", "dpsgd"], "--privacy is given twice (dplis and dpsgd)"),
    (["--privacy=dpsgd", "--privacy", "dplis"], "--privacy is given twice (dpsgd and dplis)"),
    (["--epochs", "2", "--epochs", "3"], "--epochs is given twice"),
    (["--scenario", ""], "--scenario is empty"),
    (["--strategy", " "], "--strategy is empty"),
    (["--privacy", ""], "--privacy is empty"),
    (["--data-root", ""], "--data-root is empty"),
    (["--seed", str(2 ** 32)], "--seed must be <= 4294967295"),
])
def test_contradictory_or_empty_flags_are_refused(args, expected):
    with pytest.raises(UserError) as info:
        cli.from_argv(args)
    assert expected in str(info.value)


def test_the_same_flag_twice_with_the_same_value_is_one_request():
    experiment = cli.from_argv(["--privacy", "dpsgd", "--privacy=dpsgd"])
    assert experiment.mechanism_name == "dpsgd" and experiment.run_options.privacy == "dpsgd"


@pytest.mark.parametrize("text,expected", [
    ("epochs: 1.5\n", "--epochs must be a whole number, got 1.5 (in {})"),
    ("epochs: [1, 2]\n", "--epochs must be a whole number, got [1, 2] (in {})"),
    ("epochs: true\n", "--epochs must be a whole number, got True (in {})"),
    ("lr: yes\n", "--lr must be a number, got True (in {})"),
    ("lr: fast\n", "--lr must be a number, got 'fast' (in {})"),
    ("checkpoint: 1\n", "--checkpoint must be true or false, got 1 (in {})"),
    ("scenario: [1]\n", "scenario must be a name or a clsim Scenario, got list"),
    ("strategy: ''\n", "--strategy is empty"),
    ("data-root: 3\n", "--data-root must be text, got 3 (in {})"),
    ("epochs:\n", "config file {} gives epochs no value"),
    ("- epochs\n", "must be a mapping of option names to values"),
])
def test_each_yaml_type_error_is_one_line_exit_2(tmp_path, capsys, text, expected):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(text)
    assert cli.main(["--config", str(cfg), "--out", str(tmp_path / "o")]) == 2
    one_line_error(capsys.readouterr().err, expected.format(cfg))
    assert not (tmp_path / "o").exists()


def test_yaml_exponents_are_numbers(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("lr: 1e-3\nepochs: 2\n")   # YAML 1.1 reads 1e-3 as a string
    run = cli.from_argv(["--config", str(cfg)]).run_options
    assert run.lr == 0.001 and run.epochs == 2


@pytest.mark.slow
def test_binary_garbage_as_a_config_in_a_real_process_is_one_line(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_bytes(bytes(range(256)) * 4)
    proc = subprocess.run([sys.executable, str(REPO / "run_scenario.py"), "--config", str(cfg), "--out",
                           str(tmp_path / "o")], cwd=REPO, env=ENV, capture_output=True, text=True)
    assert proc.returncode == 2
    one_line_error(proc.stderr, f"config file {cfg} is not UTF-8 text")


def read_only_directory() -> Path | None:
    for line in Path("/proc/mounts").read_text().splitlines():
        mount, options = line.split()[1], line.split()[3].split(",")
        if "ro" in options and Path(mount).is_dir() and not os.access(mount, os.W_OK):
            return Path(mount)
    return None


@pytest.mark.parametrize("where", ["file", "/dev/null", "read-only"])
def test_an_unusable_out_is_one_line_before_any_work(tmp_path, capsys, where):
    if where == "file":
        out = tmp_path / "a_file"
        out.write_text("x")
        expected = "is not a directory"
    elif where == "/dev/null":
        out, expected = Path("/dev/null"), "is not a directory"
    else:
        ro = read_only_directory()
        if ro is None:
            pytest.skip("no read-only mount on this machine")
        out, expected = ro, "is not writable (read-only file system)"
    assert cli.main(["--out", str(out), "--epochs", "1"]) == 2
    one_line_error(capsys.readouterr().err, f"--out {out}", expected)


def write_idx(path: Path, array: np.ndarray) -> None:
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_an_out_of_range_mnist_label_is_refused_naming_file_and_index(tmp_path):
    for prefix in ("train", "t10k"):
        write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", np.zeros((6, 28, 28)))
        labels = np.arange(6)
        if prefix == "train":
            labels[3] = 12
        write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", labels)
    with pytest.raises(UserError) as info:
        data.load_mnist(tmp_path)
    assert f"{tmp_path / 'train-labels-idx1-ubyte.gz'} holds label 12 at index 3" in str(info.value)


def cifar_batch(folder: Path, name: str, data, labels) -> None:
    folder.mkdir(exist_ok=True)
    batch = {b"batch_label": b"x", b"labels": labels, b"data": data, b"filenames": [b"a"] * len(labels)}
    (folder / name).write_bytes(pickle.dumps(batch, protocol=2))


@pytest.mark.parametrize("data,labels,expected", [
    (np.full((2, 3072), 0.5), [1, 2], "holds pixels of type float64, not whole numbers 0..255"),   # saved /255
    (np.full((2, 3072), 300.0, np.float32), [1, 2], "holds pixels of type float32"),
    (np.full((2, 3072), 300, np.int64), [1, 2], "holds pixel 300 at index 0; pixels are 0..255"),   # would wrap to 44
    (np.full((2, 3072), -1, np.int16), [1, 2], "holds pixel -1 at index 0"),
    (np.zeros((2, 3072), np.uint8), [1.0, 2.7], "holds a label of type float (1.0), not a whole number 0..9"),
    (np.zeros((2, 3072), np.uint8), np.array([1.0, 2.0]), "holds labels of type float64"),
    (np.zeros((2, 3072), np.uint8), [1, 10], "holds label 10 at index 1; labels are 0..9"),
    (np.zeros((2, 3072), np.uint8), [True, 2], "holds a label of type bool"),
    (np.zeros((2, 3072), np.uint8), [1, 2 ** 70], f"holds label {2 ** 70} at index 1"),
])
def test_a_cifar_batch_is_checked_before_it_is_converted(tmp_path, capsys, data, labels, expected):
    """A cast would have trained on black images (floats in [0, 1] -> 0), wrapped pixels mod 256
    or truncated labels, and exited 0."""
    folder = tmp_path / "cifar-10-batches-py"
    cifar_batch(folder, "data_batch_1", data, labels)
    assert cli.main(["--scenario", "split_cifar", "--data-root", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    one_line_error(capsys.readouterr().err, f"CIFAR-10 file {folder / 'data_batch_1'} {expected}")
    assert not (tmp_path / "o").exists()


def test_integer_cifar_pixels_in_range_of_any_integer_type_are_read_exactly(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    pixels = np.arange(2 * 3072).reshape(2, 3072) % 256
    cifar_batch(folder, "test_batch", pixels.astype(np.int64), np.array([3, 9], np.int32))
    x, y = data._read_cifar_batch(folder / "test_batch")
    assert x.dtype == np.uint8 and (x == pixels).all() and y.tolist() == [3, 9] and y.dtype == np.int64


def write_typed_idx(path: Path, array: np.ndarray) -> None:
    codes = {np.dtype(np.uint8): 0x08, np.dtype(">f8"): 0x0E, np.dtype(">i4"): 0x0C}
    header = struct.pack(">HBB", 0, codes[array.dtype], array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.tobytes())


@pytest.mark.parametrize("images,labels,expected", [
    (np.zeros((6, 28, 28), np.uint8), np.array([0, 1, 2, 9.5, 4, 5], ">f8"),
     "label file {root}/train-labels-idx1-ubyte.gz holds labels of type >f8, not whole numbers 0..9"),
    (np.full((6, 28, 28), 0.5, ">f8"), np.arange(6, dtype=np.uint8),
     "image file {root}/train-images-idx3-ubyte.gz holds pixels of type >f8"),
    (np.full((6, 28, 28), 256, ">i4"), np.arange(6, dtype=np.uint8),
     "image file {root}/train-images-idx3-ubyte.gz holds pixel 256 at index 0; pixels are 0..255"),
])
def test_mnist_idx_values_are_checked_before_they_are_converted(tmp_path, images, labels, expected):
    """A label stored as 9.5 was refused as 'holds label 9'; float or wide-integer images were
    divided by 255 into values outside [0, 1]."""
    write_typed_idx(tmp_path / "train-images-idx3-ubyte.gz", images)
    write_typed_idx(tmp_path / "train-labels-idx1-ubyte.gz", labels)
    write_typed_idx(tmp_path / "t10k-images-idx3-ubyte.gz", np.zeros((6, 28, 28), np.uint8))
    write_typed_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.arange(6, dtype=np.uint8))
    with pytest.raises(UserError) as info:
        data.load_mnist(tmp_path)
    assert "MNIST " + expected.format(root=tmp_path) in str(info.value)


def test_noise_multiplier_zero_under_privacy_says_epsilon_is_infinite(capsys):
    cli.from_argv(["--privacy", "dpsgd", "--noise-multiplier", "0"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "no privacy (ε = ∞)" in lines[0]
    cli.from_argv(["--privacy", "dpsgd", "--noise-multiplier", "0.5"])
    assert capsys.readouterr().err == ""


def _help(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit):
        cli.parse([*argv, "--help"])
    return " ".join(capsys.readouterr().out.split())


def _shown_default(text: str, flag: str) -> str:
    """What --help says `flag` defaults to (its option line, not the usage line)."""
    found = re.findall(rf"{flag} \S+ [^\[]*?\(default: ([^)]*)\)", text)
    assert len(found) == 1, (flag, found)
    return found[0]


def test_help_prints_each_default_once(capsys):
    text = _help([], capsys)
    assert "(default: the scenario's)" not in text and "(default: None)" not in text
    assert "(default: the strategy's own: none but for the dpsgd and dplis strategies)" in text
    assert "--seed SEED one seed for everything: data order, initialisation, sampling (default: 0)" in text


def test_help_shows_the_defaults_a_run_uses(capsys, tmp_path):
    """--help prints the scenario's epochs, lr, batch size and setting (declared on its options, no
    data loaded), and they are what a run records in config.json when the flags are left out."""
    text = _help([], capsys)   # the default scenario, split_digits
    shown = {f: _shown_default(text, f) for f in ("--epochs", "--lr", "--batch-size", "--setting")}
    assert shown == {"--epochs": "5 for split_digits", "--lr": "0.05 for split_digits",
                     "--batch-size": "32 for split_digits", "--setting": "class_il for split_digits"}
    assert cli.main(["--n-tasks", "2", "--loggers", "jsonl", "--out", str(tmp_path)]) == 0
    (run,) = tmp_path.iterdir()
    saved = json.loads((run / "config.json").read_text())
    assert [saved["epochs"], saved["lr"], saved["batch_size"], saved["setting"]] == [5, 0.05, 32, "class_il"]
    # a strategy designed for another setting: --help names it, the run takes it
    text = _help(["--strategy", "packnet"], capsys)
    assert _shown_default(text, "--setting") == "task_il, the setting strategy packnet is designed for"
    assert Experiment(strategy="packnet", out=None).build().hparams["setting"] == "task_il"


def test_help_says_which_option_changes_a_default(capsys, tmp_path):
    from test_scenarios import digits_as_mnist
    root = str(digits_as_mnist(tmp_path))
    text = _help(["--scenario", "split_mnist"], capsys)
    assert _shown_default(text, "--lr") == "0.1 for split_mnist; 0.01 with --mnist-protocol blip"
    assert _shown_default(text, "--batch-size") == "128 for split_mnist; 64 with --mnist-protocol blip"
    assert _shown_default(text, "--epochs") == "1 for split_mnist"
    for extra, figures in (({}, [1, 0.1, 128]), ({"mnist_protocol": "blip"}, [1, 0.01, 64])):
        hp = Experiment(scenario="split_mnist", data_root=root, train_per_class=2, test_per_class=2,
                        out=None, **extra).build().hparams
        assert [hp["epochs"], hp["lr"], hp["batch_size"], hp["setting"]] == [*figures, "class_il"]
    assert _shown_default(_help(["--scenario", "permuted_mnist"], capsys), "--setting") == "domain_il for permuted_mnist"
    # an RL scenario's, and its recommended EWC λ in the strategy's own help line
    text = _help(["--scenario", "cartpole", "--strategy", "ewc"], capsys)
    assert [_shown_default(text, f) for f in ("--epochs", "--lr", "--batch-size", "--setting", "--ewc-lambda")] == \
        ["1 for cartpole", "0.001 for cartpole", "256 for cartpole", "task_il for cartpole", "10000.0 for cartpole"]
    # a preset's values are the defaults once it is chosen
    text = _help(["--preset", "blip-mnist5"], capsys)
    assert _shown_default(text, "--epochs") == "200, from preset blip-mnist5"
    assert Experiment(preset="blip-mnist5", out=None).run_options.epochs == 200


def test_the_progress_bar_knows_its_total_and_rescales_it():
    from clsim.loggers import LogContext
    from clsim.loggers.progress import ProgressLogger
    bar = ProgressLogger(LogContext(None, {}, progress=False, planned_steps=[10, 10, 20]))
    assert bar.bar.total == 40
    bar.task({"task": 0, "step": 15, "acc": 0.0, "bwt": 0.0, "row": [0.0]})   # took 1.5x the plan
    assert bar.bar.total == 15 + 45
    bar.close({})


def test_python_dash_m_clsim_runs_the_cli(monkeypatch, capsys):
    import runpy
    monkeypatch.setattr(sys, "argv", ["clsim", "--list"])
    with pytest.raises(SystemExit) as info:
        runpy.run_module("clsim", run_name="__main__")
    assert info.value.code == 0 and "split_digits" in capsys.readouterr().out


def test_a_nan_after_the_first_task_keeps_the_run_and_says_where(tmp_path, capsys):
    """EWC with a λ SGD cannot take diverges in task 1: task 0's checkpoint and the logs stay."""
    out = tmp_path / "out"
    assert cli.main(["--strategy", "ewc", "--ewc-lambda", "1e4", "--epochs", "1", "--hidden", "20", "--n-tasks", "2",
                     "--progress", "false", "--out", str(out)]) == 2
    partial = out / ".split_digits-ewc-class_il-seed0.partial"
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "the loss became nan at task 1" in err[0] and f"kept in {partial}" in err[0]
    assert rundir._load(partial / "checkpoint.pt")["progress"]["matrix"] and '"kind": "task"' in (partial / "log.jsonl").read_text()


def test_a_full_disk_is_named_with_the_file_that_could_not_be_written(tmp_path):
    from clsim.loggers import LogContext
    from clsim.loggers.jsonl import JsonlLogger
    (tmp_path / "log.jsonl").symlink_to("/dev/full")   # a real device whose writes fail with ENOSPC
    log = JsonlLogger(LogContext(tmp_path, {}))
    with pytest.raises(OSError) as info:
        log.task({"task": 0, "step": 1})
    assert str(rundir.out_of_space(info.value, Path("/elsewhere"))) == \
        f"the disk is full (ENOSPC) while writing {tmp_path / 'log.jsonl'}"
    assert log.file.closed   # its failed buffer is not written again at exit


def test_renames_are_made_durable_by_fsyncing_their_directory(tmp_path, monkeypatch):
    """After each rename (config, checkpoint, summary, the final name) the directory holding the
    new name is fsynced: the real os.fsync runs, and each directory fsync is recorded with what
    the directory held then."""
    real_fsync, synced = os.fsync, []

    def fsync(fd):
        real_fsync(fd)
        if os.path.isdir(f"/proc/self/fd/{fd}"):
            synced.append((os.fstat(fd).st_ino, sorted(os.listdir(fd))))
    monkeypatch.setattr(os, "fsync", fsync)
    assert cli.main(["--n-tasks", "2", "--epochs", "1", "--loggers", "jsonl", "--out", str(tmp_path)]) == 0
    (run,) = tmp_path.iterdir()
    root_listings = [names for ino, names in synced if ino == tmp_path.stat().st_ino]
    run_listings = [names for ino, names in synced if ino == run.stat().st_ino]
    assert root_listings[0] == [f".{run.name}.partial"] and root_listings[-1] == [run.name]
    assert [n for n in run_listings if rundir.CHECKPOINT in n and rundir.CONFIG in n]   # after the checkpoint's rename
    assert run_listings[-1] == sorted(p.name for p in run.iterdir())   # summary.json's rename, the last
    assert not [n for n in run_listings if any(x.endswith(".tmp") for x in n)]   # always after the rename


def test_fsync_dir_passes_over_directories_that_cannot_be_fsynced():
    fd = os.open("/proc", os.O_RDONLY)
    try:
        with pytest.raises(OSError) as refused:   # Linux refuses to fsync /proc ...
            os.fsync(fd)
    finally:
        os.close(fd)
    assert refused.value.errno == errno.EINVAL
    rundir.fsync_dir(Path("/proc"))   # ... which is no failure of the run


# ------------------------------------------------------------------ resume only what the checkpoint is

SMALL = ["--n-tasks", "2", "--epochs", "1", "--hidden", "20", "--loggers", "jsonl", "--progress", "false"]
SMALL_NAME = "split_digits-naive-class_il-seed0"


@pytest.fixture(scope="module")
def finished_small(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("small")
    assert cli.main([*SMALL, "--out", str(out)]) == 0
    return out / SMALL_NAME


@pytest.fixture
def partial(finished_small, tmp_path) -> Path:
    """A copy of a finished run as an interrupted one (its checkpoint, config and log, hidden)."""
    import shutil
    partial = tmp_path / f".{SMALL_NAME}.partial"
    shutil.copytree(finished_small, partial)
    (partial / "summary.json").unlink()
    return partial


def refused_resume(partial: Path, capsys, *expected: str) -> None:
    """`--resume` exits 2 with one line and changes nothing in the directory."""
    before = {p.name: p.read_bytes() for p in partial.iterdir()}
    assert cli.main(["--resume", str(partial)]) == 2
    one_line_error(capsys.readouterr().err, *expected)
    assert {p.name: p.read_bytes() for p in partial.iterdir()} == before


@pytest.mark.parametrize("key,value,shown", [
    ("strategy", "ewc", "strategy: 'naive' when it started, 'ewc' now"),
    ("hidden", 400, "hidden: 20 when it started, 400 now"),
    ("lr", 0.5, "lr: 0.05 when it started, 0.5 now"),
    ("seed", 5, "seed: 0 when it started, 5 now"),
    ("argv", ["--epochs", "2"], "argv: "),   # would have trained tasks 1.. at 2 epochs, task 0 at 1
    ("scenario_info", {}, "scenario_info.test_size: 539 when it started, absent now"),
])
def test_an_edited_config_json_is_refused_not_ignored_or_copied(partial, capsys, key, value, shown):
    config = json.loads((partial / "config.json").read_text())
    original = config[key]
    config[key] = [*original, *value] if key == "argv" else value
    (partial / "config.json").write_text(json.dumps(config, indent=2))
    refused_resume(partial, capsys, f"{partial / 'config.json'} was changed after the run started ({shown}",
                   "undo the change, or start a new run")
    config[key] = original   # undone: the run resumes, and its config.json is the one it started with
    (partial / "config.json").write_text(json.dumps(config, indent=2))
    assert cli.main(["--resume", str(partial)]) == 0
    finished = partial.parent / SMALL_NAME
    assert json.loads((finished / "config.json").read_text()) == config
    assert json.loads((finished / "summary.json").read_text())["strategy"] == config["strategy"]


def test_an_edited_argv_seed_cannot_relabel_the_figures(partial, capsys):
    """The run resumes with the checkpoint's own flags; an edited config.json is refused, so a
    summary can never say seed 5 over seed 0's figures."""
    config = json.loads((partial / "config.json").read_text())
    config["argv"] += ["--seed", "5"]
    (partial / "config.json").write_text(json.dumps(config))
    refused_resume(partial, capsys, "was changed after the run started (argv:")


@pytest.mark.parametrize("extra", [["--epochs", "2"], ["--workers"], ["--workers", "2", "--workers", "1"],
                                   ["--seed", "5", "--workers", "1"]])
def test_resume_takes_only_where_the_run_runs(partial, capsys, extra):
    before = {p.name: p.read_bytes() for p in partial.iterdir()}
    assert cli.main(["--resume", str(partial), *extra]) == 2
    one_line_error(capsys.readouterr().err, "--resume takes the interrupted run's .partial directory and, at most, "
                   "--workers N and --address A")
    assert {p.name: p.read_bytes() for p in partial.iterdir()} == before


def test_resume_takes_a_worker_count_and_gives_the_runs_figures(finished_small, partial):
    """Where a run runs is no part of what it computes: a worker count given at resume is taken
    (tests/test_distributed.py changes it between 1 and 2), and the figures are the run's."""
    assert cli.main(["--resume", str(partial), "--workers", "1"]) == 0
    resumed = json.loads((partial.parent / SMALL_NAME / "summary.json").read_text())
    whole = json.loads((finished_small / "summary.json").read_text())
    assert resumed["accuracy_matrix"] == whole["accuracy_matrix"] and resumed["steps"] == whole["steps"]


def rewrite_checkpoint(partial: Path, change, seal: bool = True) -> None:
    """Change a checkpoint's contents; `seal`: with a matching digest, as if clsim had written it so."""
    state = torch.load(partial / "checkpoint.pt", weights_only=True)
    state.pop("digest", None)
    change(state)
    torch.save({**state, "digest": rundir.digest(state)} if seal else state, partial / "checkpoint.pt")


def _nan_weight(state):
    state["model"][next(iter(state["model"]))][0] = float("nan")


def _wider(state):
    name = next(iter(state["model"]))
    state["model"][name] = torch.zeros(3, *state["model"][name].shape)


@pytest.mark.parametrize("change,expected", [
    (lambda s: s.pop("rng"), "the checkpoint lacks 'rng' (it was damaged or edited); start the run again"),
    (lambda s: s.pop("model"), "the checkpoint lacks 'model'"),
    (lambda s: s["rng"].pop("learner"), "the checkpoint lacks 'learner'"),
    (lambda s: s["progress"].update(matrix="x"), "the checkpoint does not fit this run (TypeError: its progress"),
    (lambda s: s["progress"].pop("step"), "the checkpoint lacks 'step'"),
    (lambda s: s["progress"].update(extra=1), "the checkpoint does not fit this run (TypeError"),
    (_wider, "the checkpoint does not fit this run (RuntimeError: Error(s) in loading state_dict"),
    (_nan_weight, "the checkpoint holds non-finite weights (backbone.body.1.weight); it was damaged or edited"),
    (lambda s: s.pop("config"), "records no run configuration (it was written by an older clsim, or damaged)"),
])
def test_a_damaged_checkpoint_is_one_line_not_a_traceback_or_a_nan_loss(partial, capsys, change, expected):
    rewrite_checkpoint(partial, change)
    refused_resume(partial, capsys, expected)


def test_a_checkpoint_whose_contents_changed_after_it_was_written_is_refused(partial, capsys):
    """torch.load checks no checksum: a flipped bit in a weight resumed silently from other weights."""
    raw = bytearray((partial / "checkpoint.pt").read_bytes())
    weights = torch.load(partial / "checkpoint.pt", weights_only=True)["model"]["heads.0.bias"]
    at = raw.find(weights.numpy().tobytes())
    assert at > 0
    raw[at] ^= 0x01
    (partial / "checkpoint.pt").write_bytes(bytes(raw))
    refused_resume(partial, capsys, "checkpoint.pt is damaged: its contents do not match the digest saved with them")
    rewrite_checkpoint(partial, lambda s: s["progress"].update(step=1), seal=False)   # edited, not resealed
    refused_resume(partial, capsys, "checkpoint.pt is damaged: its contents do not match the digest")
    rewrite_checkpoint(partial, lambda s: None, seal=False)   # no digest at all
    refused_resume(partial, capsys, "(it has none: written by an older clsim?)")


def test_a_run_is_not_resumed_by_other_code_or_other_options(partial, monkeypatch):
    from clsim import experiment
    options = dict(n_tasks=2, epochs=1, hidden=20, loggers="jsonl", progress=False, out=str(partial.parent))
    with pytest.raises(UserError, match=re.escape("cannot be resumed by this code with these options (lr: 0.05 "
                                                  "when it started, 0.1 now)")):
        Experiment(**options, lr=0.1).run(resume_dir=partial)
    with pytest.raises(UserError, match="cannot be resumed by this code with these options .audit.audit: None"):
        Experiment(**options, audit="mia").run(resume_dir=partial)
    monkeypatch.setattr(experiment, "source_digest", lambda: "0123456789abcdef")   # clsim edited meanwhile
    with pytest.raises(UserError, match=r"\(versions.clsim_source: '[0-9a-f]{16}' when it started, "
                                        r"'0123456789abcdef' now\); resume it with the clsim"):
        Experiment(**options).run(resume_dir=partial)
    monkeypatch.undo()
    # who watches a run is no part of it: other loggers, progress and out resume it
    assert Experiment(**{**options, "loggers": "jsonl,csv", "progress": True}).run(resume_dir=partial).acc >= 0


# ------------------------------------------------------------------ sizes and names a run cannot hold

@pytest.mark.parametrize("args,expected", [
    (["--batch-size", "99999999999999999999999"], "--batch-size must be <= 2147483647, got 99999999999999999999999"),
    (["--epochs", str(2 ** 40)], "--epochs must be <= 2147483647"),
    (["--strategy", "er", "--replay-size", "1e23"], "--replay-size must be a whole number, got '1e23'"),
    (["--strategy", "er", "--replay-size", str(2 ** 63)], "--replay-size must be <= 2147483647"),
    (["--class-order-seed", str(2 ** 64)], "--class-order-seed must be <= 2147483647"),
    (["--lr", "1e308"], "--lr must be <= 3.4028234663852886e+38, got 1e+308"),   # torch could not convert it
])
def test_every_number_option_is_bounded(tmp_path, capsys, args, expected):
    assert cli.main([*args, "--out", str(tmp_path / "o")]) == 2
    one_line_error(capsys.readouterr().err, expected)
    assert not (tmp_path / "o").exists()


def test_every_number_option_has_a_bound():
    """Each int and float field of every party's options, one past its bound (INT_HIGH or FLOAT_HIGH
    unless it states one: --lr 1e308 was a torch conversion traceback), is refused with its own flag."""
    import dataclasses
    import typing
    from clsim.registry import LOGGERS, MECHANISMS, SCENARIOS, STRATEGIES
    from clsim.privacy.audit import AuditOptions
    classes = {cli.config.RunOptions, cli.config.ProtocolOptions, AuditOptions}
    classes |= {e.options for r in (SCENARIOS, MECHANISMS) for e in r.entries() if e.options}
    classes |= {e.target.Options for r in (STRATEGIES, LOGGERS) for e in r.entries()
                if getattr(e.target, "Options", None)}
    past = {int: lambda high: (high or cli.config.INT_HIGH) + 1,
            float: lambda high: math.nextafter(high or cli.config.FLOAT_HIGH, math.inf)}
    tried = {int: 0, float: 0}
    for cls in classes:
        for f in dataclasses.fields(cls):
            kind = cli.config._scalar_type(typing.get_type_hints(cls)[f.name])
            if kind in past:
                with pytest.raises(UserError, match=re.escape(cli.config.flag(f.name)) + " must be <="):
                    cli.config.build(cls, {f.name: past[kind](f.metadata.get("high"))})
                tried[kind] += 1
    assert tried[int] > 40 and tried[float] > 40


@pytest.mark.slow
def test_a_diverging_gem_step_is_the_engines_one_line_not_a_solver_traceback(tmp_path, capsys):
    """GEM's QP solver was handed the NaN gradients of a diverged step (scipy: 'SVD did not converge')."""
    assert cli.main(["--strategy", "gem", "--gem-margin", "3e38", "--n-tasks", "2", "--epochs", "1", "--hidden", "8",
                     "--out", str(tmp_path / "o")]) == 2
    one_line_error(capsys.readouterr().err, "the loss became nan at task 1 ")


def test_a_model_too_large_for_memory_is_one_line_before_it_is_allocated(tmp_path, capsys):
    before = rss_now()
    assert cli.main(["--hidden", "100000000", "--out", str(tmp_path / "o")]) == 2
    one_line_error(capsys.readouterr().err, "the model needs ", " GiB for its weights and their gradients alone, "
                   "more than the ", "GiB free on cpu; choose a smaller model")
    assert rss_now() - before < 2**30 and not (tmp_path / "o").exists()


@pytest.mark.parametrize("argv, said", [
    (["--hidden", "2147483647"], "the model is too large for any machine"),   # the meta probe overflowed
    (["--strategy", "er", "--epochs", "10000000", "--replay-size", "2000000000"],
     "--replay-size 2000000000: a buffer of 2000000000 (as many as this run fills) needs "),
    (["--strategy", "dplis", "--dplis-k", "2147483647"], "--dplis-k 2147483647 perturbed copies of the model need "),
])
def test_the_largest_sizes_options_take_are_one_line_before_anything_is_allocated(argv, said, tmp_path, capsys):
    """Sizes within the bound every integer option has (2^31 - 1) that no machine can hold: torch was
    asked for 550 GB and died with a traceback."""
    before = rss_now()
    assert cli.main([*argv, "--n-tasks", "2", "--out", str(tmp_path / "o")]) == 2
    one_line_error(capsys.readouterr().err, said)
    assert rss_now() - before < 2**30 and not (tmp_path / "o").exists()


@pytest.mark.parametrize("argv, said", [
    (["--strategy", "er", "--replay-from-task", "2"], "--replay-from-task 2 is past the last task (this stream has 2"),
    (["--strategy", "packnet", "--setting", "task_il", "--epochs", "3", "--packnet-retrain-epochs", "3"],
     "--packnet-retrain-epochs 3 leaves no epoch of --epochs 3 to train before pruning; give at most 2"),
    (["--strategy", "packnet", "--setting", "task_il", "--epochs", "1", "--packnet-retrain-epochs", "2"],
     "--packnet-retrain-epochs 2 leaves no epoch of --epochs 1"),
])
def test_a_schedule_option_that_could_never_take_effect_is_refused(argv, said, tmp_path, capsys):
    """Both ran to exit 0 as a different method: ER that never replayed, PackNet that pruned after the
    task with no retraining epoch at all."""
    assert cli.main([*argv, "--n-tasks", "2", "--hidden", "8", "--progress", "false", "--out", str(tmp_path / "o")]) == 2
    one_line_error(capsys.readouterr().err, said)
    assert not (tmp_path / "o").exists()


def test_cli_main_leaves_the_warning_hook_as_it_found_it(tmp_path, capsys):
    """main is called in-process (tests, notebooks): its one-line warnings stayed installed after it."""
    import warnings
    before = warnings.showwarning
    assert cli.main(["--epochs", "0", "--out", str(tmp_path / "o")]) == 2
    assert warnings.showwarning is before


def test_a_penalty_whose_importance_overflowed_names_no_strength_that_would_do(recwarn):
    """An infinite curvature gave 'use --ewc-lambda below 0', a value the option refuses and that
    would not help: the importance itself is broken."""
    from clsim.strategy import check_penalty_curvature
    parts = Experiment(scenario="split_digits", strategy="ewc", n_tasks=2, hidden=8).build()
    task = parts.scenario.tasks[0]
    check_penalty_curvature(parts.strategy, task, 1e9, "EWC after task 0: the penalty's curvature", "--ewc-lambda", 1.0)
    check_penalty_curvature(parts.strategy, task, math.inf, "EWC after task 0: the penalty's curvature", "--ewc-lambda", 1.0)
    finite, infinite = (str(w.message) for w in recwarn)
    assert f"use --ewc-lambda below {parts.learner.max_stable_curvature() / 1e9:.3g} or a smaller --lr" in finite
    assert "below" not in infinite and "non-finite value (it overflowed), so no --ewc-lambda helps" in infinite


def rss_now() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_the_size_check_leaves_every_random_stream_as_it_was():
    from clsim.models import check_size
    make = lambda: torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 4))
    for probe in (False, True):
        torch.manual_seed(3), np.random.seed(3), random.seed(3)
        if probe:
            check_size(make, torch.device("cpu"))
        weights = [p.detach().clone() for p in make().parameters()]
        draws = (torch.rand(2), np.random.rand(2), random.random())
        if not probe:
            plain = weights, draws
    assert all(torch.equal(a, b) for a, b in zip(weights, plain[0]))
    assert torch.equal(draws[0], plain[1][0]) and (draws[1] == plain[1][1]).all() and draws[2] == plain[1][2]


@pytest.mark.parametrize("shape", ["one long name", "a deep path"])
def test_an_out_the_file_system_cannot_hold_is_one_line_before_any_work(tmp_path, capsys, shape):
    out = tmp_path / ("a" * 300) if shape == "one long name" else tmp_path.joinpath(*["d" * 200] * 20)
    assert cli.main(["--out", str(out), "--epochs", "1"]) == 2
    expected = "is 300 bytes long, more than the 255 this file system allows" if shape == "one long name" else \
        "what a run writes below it needs up to 256 more, past the 4096 this file system allows"
    one_line_error(capsys.readouterr().err, "--out ", expected, "give a shorter one")
    assert list(tmp_path.iterdir()) == []


def test_a_run_name_the_file_system_cannot_hold_is_one_line_and_writes_nothing(tmp_path):
    from clsim.strategy import Strategy

    class Long(Strategy):
        name = "s" * 250
    with pytest.raises(UserError, match=f"the run directory of split_digits-{'s' * 250}-class_il-seed0: the name "
                                        f"\\.split_digits-s+\\.\\.\\. is 291 bytes long, more than the 255"):
        Experiment(strategy=Long, n_tasks=2, epochs=1, out=str(tmp_path / "o")).run()
    assert not (tmp_path / "o").exists() or list((tmp_path / "o").iterdir()) == []


def test_a_failed_run_closes_its_writers_before_its_directory_is_removed(tmp_path, capsys):
    """A NaN in the first task removes the run directory; TensorBoard's writer thread, left open,
    then raced the removal (a thread traceback in 1 run of 5). Every writer is closed first."""
    import threading
    before = set(threading.enumerate())
    assert cli.main(["--lr", "1e6", "--epochs", "1", "--n-tasks", "2", "--loggers", "tensorboard,jsonl,csv",
                     "--progress", "false", "--out", str(tmp_path / "o")]) == 2
    one_line_error(capsys.readouterr().err, "the loss became nan at task 0")
    left = [t for t in set(threading.enumerate()) - before if t.is_alive() and t.name != "tqdm_monitor"]
    assert left == [] and list((tmp_path / "o").iterdir()) == []   # (tqdm's monitor is one per process)


# ------------------------------------------------------------------ models passed in

class _Net(torch.nn.Module):
    def __init__(self, outputs: int = 10):
        super().__init__()
        self.body = torch.nn.Linear(64, outputs)

    def forward(self, x, task):
        return self.body(x.flatten(1))


def test_a_model_object_is_copied_so_a_second_run_starts_from_the_same_weights():
    """Two Experiments with one model and one seed gave ACC 70.16, then 89.98: the second trained
    on from the first's weights. Each run now trains its own copy; the caller's model is unchanged."""
    torch.manual_seed(0)
    model = _Net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    options = dict(n_tasks=2, epochs=1, seed=3, out=None, progress=False, loggers=[])
    first, second = (Experiment(model=model, **options).run() for _ in range(2))
    assert first.summary["accuracy_matrix"] == second.summary["accuracy_matrix"]
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    with pytest.raises(UserError, match="unsupported model: it cannot be copied for the run .* pass a function"):
        Experiment(model=_Uncopyable(), **options).build()


class _Uncopyable(_Net):
    def __deepcopy__(self, memo):
        raise TypeError("cannot pickle '_thread.lock' object")


class _NoTask(_Net):
    def forward(self, x):
        return self.body(x.flatten(1))


class _Pair(_Net):
    def forward(self, x, task):
        return self.body(x.flatten(1)), None


class _Bare(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(64, 10))

    def forward(self, x, task):
        return x.flatten(1) @ self.w


@pytest.mark.parametrize("model,options,expected", [
    (_NoTask(), {}, "unsupported model: model(x, task) failed on task 0's inputs (torch.float32 (2, 1, 8, 8)) with "
                    "TypeError: _NoTask.forward() takes 2 positional arguments but 3 were given"),
    (_Net(7), {}, "unsupported model: it gives 7 logits for task 1, whose labels run to 9; it needs at least 10"),
    (_Pair(), {}, "unsupported model: model(x, task) returned tuple for 2 inputs; it must return logits"),
    (_Bare(), {"privacy": "dpsgd"}, "unsupported model: under a privacy mechanism, the model itself (_Bare) holds "
                                    "parameters of its own (w) and is called with more than tensors"),
    (torch.nn.Flatten(), {}, "unsupported model: it has no trainable parameters"),
])
def test_the_model_contract_is_checked_at_build_in_one_line(tmp_path, capsys, model, options, expected):
    """A model that does not take (x, task), has too few outputs, or (under --privacy) bare
    parameters failed with a raw torch TypeError, an IndexError, or an Opacus AttributeError."""
    with pytest.raises(UserError) as info:
        Experiment(model=model, n_tasks=2, epochs=1, out=str(tmp_path / "o"), progress=False, **options).run()
    assert expected in str(info.value) and "\n" not in str(info.value)
    assert not (tmp_path / "o").exists() or list((tmp_path / "o").iterdir()) == []
    assert Experiment(model=_Bare(), n_tasks=2, epochs=1, out=None, progress=False, loggers=[]).run().acc >= 0


def test_a_malformed_ray_address_is_one_line(tmp_path, capsys):
    """Ray's ValueError for an address of no known form was a traceback (found by the fuzz test)."""
    assert cli.main(["--workers", "2", "--address", "x", "--out", str(tmp_path / "o")]) == 2
    one_line_error(capsys.readouterr().err, "--address x: Invalid address format: x; give host:port")
    assert not (tmp_path / "o").exists()
