"""Image scenarios: the IDX reader, split_mnist / permuted_mnist on IDX files the tests write from
real digits, split_cifar on real CIFAR-10, and every missing or corrupt data file."""
from __future__ import annotations

import gzip
import struct
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from clsim.config import RunOptions
from clsim import cli
from clsim.data import read_idx
from clsim.errors import UserError
from clsim.scenarios.mnist import PermutedMnistOptions, SplitMnistOptions, permuted_mnist, split_mnist
from clsim.data import cached_mnist, crop_flip, first_per_class
from clsim.scenarios.split_cifar import SplitCifarOptions, split_cifar
from clsim.data import class_order
from conftest import read_summary, run_cli

IDX_CODES = {np.uint8: 0x08, np.int8: 0x09, np.dtype(">i2"): 0x0B, np.dtype(">i4"): 0x0C,
             np.dtype(">f4"): 0x0D, np.dtype(">f8"): 0x0E}


def write_idx(path: Path, array: np.ndarray) -> Path:
    """An IDX file as the format defines it: zero, type code, rank, big-endian sizes, data."""
    code = IDX_CODES[array.dtype.type if array.dtype.type in IDX_CODES else array.dtype]
    raw = struct.pack(">HBB", 0, code, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()
    with (gzip.open if path.suffix == ".gz" else open)(path, "wb") as f:
        f.write(raw)
    return path


def digits_as_mnist(root: Path, gz_train: bool = True) -> Path:
    """scikit-learn's real 8x8 digits upscaled to 28x28 uint8, written as the four MNIST IDX files
    (training files gzipped, test files plain), 1400 training and 397 test images."""
    from sklearn.datasets import load_digits
    d = load_digits()
    x = F.interpolate(torch.tensor(d.images, dtype=torch.float32)[:, None] / 16, size=(28, 28), mode="bilinear")
    images = (x.squeeze(1) * 255).round().clamp(0, 255).to(torch.uint8).numpy()
    labels = d.target.astype(np.uint8)
    root.mkdir(parents=True, exist_ok=True)
    suffix = ".gz" if gz_train else ""
    write_idx(root / f"train-images-idx3-ubyte{suffix}", images[:1400])
    write_idx(root / f"train-labels-idx1-ubyte{suffix}", labels[:1400])
    write_idx(root / "t10k-images-idx3-ubyte", images[1400:])
    write_idx(root / "t10k-labels-idx1-ubyte", labels[1400:])
    return root


@pytest.fixture(scope="module")
def mnist_root(tmp_path_factory) -> Path:
    return digits_as_mnist(tmp_path_factory.mktemp("mnist"))


def main_in_process(capsys, out: Path, *args: str) -> SimpleNamespace:
    """clsim.cli.main, the CLI's entry point, in this process (saves start-up; data stays cached)."""
    code = cli.main(["--out", str(out), "--progress", "false", *args])
    captured = capsys.readouterr()
    return SimpleNamespace(returncode=code, stdout=captured.out, stderr=captured.err)


def assert_user_error(proc, out: Path, names: str) -> None:
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and names in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out.exists() or not any(out.iterdir()), list(out.iterdir())


# ------------------------------------------------------------------------------ IDX reader

@pytest.mark.parametrize("dtype", [np.uint8, np.int8, ">i2", ">i4", ">f4", ">f8"])
@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_idx_reader_round_trips_every_type(tmp_path, dtype, suffix):
    rng = np.random.default_rng(7)
    array = (rng.standard_normal((3, 5, 4)) * 50).astype(dtype)
    back = read_idx(write_idx(tmp_path / f"a.idx{suffix}", array))
    assert back.shape == (3, 5, 4) and back.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(back, array)


def test_idx_reader_reads_the_official_header_bytes(tmp_path):
    # 0x00000801: unsigned bytes, rank 1 (the MNIST label files), sizes big-endian.
    path = tmp_path / "labels"
    path.write_bytes(bytes([0, 0, 8, 1, 0, 0, 0, 3, 7, 2, 9]))
    np.testing.assert_array_equal(read_idx(path), [7, 2, 9])


@pytest.mark.parametrize("raw, why", [(bytes([1, 0, 8, 1, 0, 0, 0, 1, 5]), "bad magic"),
                                      (bytes([0, 0, 8, 1, 0, 0, 0, 4, 5]), "1 values"),
                                      (bytes([0, 0]), "unpack")])
def test_idx_reader_rejects_corrupt_files_naming_them(tmp_path, raw, why):
    path = tmp_path / "broken-idx1-ubyte"
    path.write_bytes(raw)
    with pytest.raises(UserError, match="broken-idx1-ubyte") as info:
        read_idx(path)
    assert why in str(info.value)


def test_idx_reader_rejects_a_truncated_gzip(tmp_path):
    path = write_idx(tmp_path / "x.gz", np.arange(1000, dtype=np.uint8).reshape(10, 100))
    path.write_bytes(path.read_bytes()[:30])
    with pytest.raises(UserError, match="x.gz"):
        read_idx(path)


def test_idx_reader_reads_every_gzip_member_and_checks_crc_and_length(tmp_path):
    array = np.arange(3000, dtype=np.uint8).reshape(30, 100)
    raw = write_idx(tmp_path / "plain", array).read_bytes()
    # two members, as `cat a.gz b.gz` makes them: the trailer states only the last member's size
    (tmp_path / "two.gz").write_bytes(gzip.compress(raw[:1000]) + gzip.compress(raw[1000:]))
    np.testing.assert_array_equal(read_idx(tmp_path / "two.gz"), array)
    for at, why in ((-8, "incorrect data check"), (-1, "incorrect length check")):   # CRC-32, then size (4 GiB)
        forged = bytearray(gzip.compress(raw))
        forged[at] ^= 0xFF
        (tmp_path / "forged.gz").write_bytes(forged)
        with pytest.raises(UserError, match=f"forged.gz.*{why}"):
            read_idx(tmp_path / "forged.gz")


# ------------------------------------------------------------------------------ MNIST scenarios

@pytest.mark.slow
def test_split_mnist_cli_trains_five_tasks_of_two_digits(mnist_root, tmp_path):
    run_cli("--scenario", "split_mnist", "--data-root", str(mnist_root), "--epochs", "4",
            "--batch-size", "32", out=tmp_path)
    s = read_summary(tmp_path)
    assert s["scenario"] == "split_mnist" and s["setting"] == "class_il"
    R = np.array(s["accuracy_matrix"])
    assert R.shape == (5, 5)
    assert s["scenario_info"]["train_size"] == 1400 and s["scenario_info"]["hidden"] == [400, 400]
    # Tasks are learned when trained (two digits: chance is 50%), then overwritten in class_il
    # (naive fine-tuning predicts only the last task's digits).
    assert np.diag(R).mean() > 75
    assert R[-1, :4].max() < 20


def test_split_mnist_task_il_relabels_each_pair(mnist_root):
    run = RunOptions(data_root=str(mnist_root), setting="task_il", download=False)
    sc = split_mnist(SplitMnistOptions(class_order_seed=1, train_per_class=30), run)
    order = class_order(10, 1)
    assert [t.classes for t in sc.tasks] == [tuple(order[2 * i:2 * i + 2]) for i in range(5)]
    for t in sc.tasks:
        assert set(t.train.y.tolist()) == {0, 1} and len(t.train) == 60
        assert t.train.x.shape[1:] == (1, 28, 28) and float(t.train.x.max()) <= 1.0
    assert [h.out_features for h in sc.make_model().heads] == [2] * 5


def test_split_mnist_explicit_class_order_pairs_and_labels_digits_in_that_order(mnist_root):
    """--class-order replays another code's split (van de Ven's seed 1: 4/6, 0/5, 3/9, 2/7, 8/1):
    each task holds its two digits, the first labelled 0 in domain_il; a list that is not the ten
    digits once each is a UserError."""
    run = RunOptions(data_root=str(mnist_root), setting="domain_il", download=False)
    sc = split_mnist(SplitMnistOptions(class_order="4,6,0,5,3,9,2,7,8,1", train_per_class=30), run)
    assert [t.classes for t in sc.tasks] == [(4, 6), (0, 5), (3, 9), (2, 7), (8, 1)]
    _, y_train, _, _ = cached_mnist(str(Path(mnist_root).resolve()))
    digits = y_train[first_per_class(y_train, 30)]
    for t in sc.tasks:
        assert torch.equal(t.train.y, (digits[torch.isin(digits, torch.tensor(t.classes))] == t.classes[1]).long())
    for bad in ("1,2", "0,1,2,3,4,5,6,7,8,8", "a,b"):
        with pytest.raises(UserError, match="--class-order"):
            split_mnist(SplitMnistOptions(class_order=bad), run)


def test_split_mnist_vandeven_class_order_is_the_pairing_their_code_draws_at_each_seed(mnist_root):
    """--class-order vandeven: seed 0 pairs 0/1, 2/3, ...; other seeds the pairing van de Ven's own
    data.py gives (read from their code at commit d326f96 for seeds 1, 2, 3, 20), digit d's label
    perm[d] fixing which digit comes first in a task; the vdv split-MNIST presets select it."""
    their_pairs = {0: [(0, 1), (2, 3), (4, 5), (6, 7), (8, 9)], 1: [(4, 6), (0, 5), (3, 9), (2, 7), (8, 1)],
                   2: [(3, 1), (5, 6), (0, 2), (7, 4), (9, 8)], 3: [(7, 2), (3, 8), (1, 0), (5, 6), (9, 4)],
                   20: [(4, 1), (5, 9), (8, 3), (6, 0), (2, 7)]}
    for seed, pairs in their_pairs.items():
        run = RunOptions(data_root=str(mnist_root), setting="domain_il", seed=seed, download=False)
        sc = split_mnist(SplitMnistOptions(class_order="vandeven", train_per_class=5), run)
        assert [t.classes for t in sc.tasks] == pairs
    from clsim import presets
    vdv = [p for name, p in presets.all_presets().items() if name.startswith("vdv-splitmnist-")]
    assert len(vdv) == 19 and all(p.options["class_order"] == "vandeven" for p in vdv)


@pytest.mark.slow
def test_permuted_mnist_cli_domain_il_shares_one_head(mnist_root, tmp_path, capsys):
    proc = main_in_process(capsys, tmp_path, "--scenario", "permuted_mnist", "--data-root", str(mnist_root),
                           "--n-permutations", "3", "--train-per-class", "60", "--epochs", "2")
    assert proc.returncode == 0, proc.stderr
    s = read_summary(tmp_path)
    assert s["setting"] == "domain_il" and np.array(s["accuracy_matrix"]).shape == (3, 3)
    assert s["scenario_info"]["train_size"] == 600
    assert min(s["accuracy_matrix"][i][i] for i in range(3)) > 50      # 10-way, chance is 10%


def test_permuted_mnist_tasks_are_fixed_pixel_permutations(mnist_root):
    from clsim.data import load_mnist
    run = RunOptions(data_root=str(mnist_root), setting=None, download=False)
    sc = permuted_mnist(PermutedMnistOptions(n_permutations=3, train_per_class=5), run)
    x_train, y_train, x_test, y_test = load_mnist(mnist_root)
    keep = first_per_class(y_train, 5)
    g = torch.Generator().manual_seed(0)          # --permutation-seed 0: one permutation per task
    for task in sc.tasks:
        perm = torch.randperm(784, generator=g)
        assert torch.equal(task.train.x.flatten(1), x_train[keep].flatten(1)[:, perm])
        assert torch.equal(task.test.x.flatten(1), x_test.flatten(1)[:, perm])
        assert torch.equal(task.train.y, y_train[keep]) and task.n_outputs == 10
    assert not torch.equal(sc.tasks[0].train.x, sc.tasks[1].train.x)
    other_seed = permuted_mnist(PermutedMnistOptions(n_permutations=3, train_per_class=5,
                                                     permutation_seed=1), run)
    assert not torch.equal(other_seed.tasks[2].test.x, sc.tasks[2].test.x)


def test_permuted_mnist_task_il_and_class_il_heads(mnist_root):
    opts = PermutedMnistOptions(n_permutations=4, train_per_class=5, mnist_protocol="blip")
    task_il = permuted_mnist(opts, RunOptions(data_root=str(mnist_root), setting="task_il", download=False))
    assert [h.out_features for h in task_il.make_model().heads] == [10] * 4
    class_il = permuted_mnist(opts, RunOptions(data_root=str(mnist_root), setting="class_il", download=False))
    assert [h.out_features for h in class_il.make_model().heads] == [40]
    assert set(class_il.tasks[3].train.y.tolist()) == set(range(30, 40))
    # BLIP's q_mlp.py: ONE hidden layer of 1200, then the head(s)
    body = [m.out_features for m in class_il.make_model().backbone.body if isinstance(m, torch.nn.Linear)]
    assert body == [1200] and class_il.defaults == {"epochs": 1, "lr": 0.01, "batch_size": 64}


@pytest.mark.slow
def test_blip_protocol_sets_defaults_that_flags_override(mnist_root, tmp_path, capsys):
    proc = main_in_process(capsys, tmp_path, "--scenario", "split_mnist", "--data-root", str(mnist_root),
                           "--mnist-protocol", "blip", "--mnist-hidden", "32", "--batch-size", "100",
                           "--train-per-class", "20")
    assert proc.returncode == 0, proc.stderr
    s = read_summary(tmp_path)
    assert s["hparams"]["lr"] == 0.01 and s["hparams"]["batch_size"] == 100
    assert s["scenario_info"]["hidden"] == [32]


@pytest.mark.parametrize("missing", ["t10k-labels-idx1-ubyte", "train-images-idx3-ubyte"])
def test_missing_mnist_file_exits_2_naming_it(tmp_path, missing, capsys):
    root = digits_as_mnist(tmp_path / "data", gz_train=False)
    (root / missing).unlink()
    out = tmp_path / "runs"
    proc = main_in_process(capsys, out, "--scenario", "split_mnist", "--data-root", str(root))
    assert_user_error(proc, out, missing)


def test_corrupt_mnist_file_exits_2_naming_it(tmp_path, capsys):
    root = digits_as_mnist(tmp_path / "data")
    (root / "train-labels-idx1-ubyte.gz").write_bytes(b"not a gzip file at all")
    out = tmp_path / "runs"
    proc = main_in_process(capsys, out, "--scenario", "permuted_mnist", "--data-root", str(root))
    assert_user_error(proc, out, "train-labels-idx1-ubyte.gz")


def test_bad_mnist_hidden_exits_2(mnist_root, tmp_path, capsys):
    out = tmp_path / "runs"
    proc = main_in_process(capsys, out, "--scenario", "split_mnist", "--data-root", str(mnist_root),
                           "--mnist-hidden", "64,zero")
    assert_user_error(proc, out, "--mnist-hidden")


# ------------------------------------------------------------------------------ split_cifar

@pytest.mark.slow
def test_split_cifar_cli_on_real_cifar10(cifar_root, tmp_path):
    run_cli("--scenario", "split_cifar", "--data-root", str(cifar_root), "--train-per-class", "20",
            "--test-per-class", "10", "--class-order-seed", "3", "--batch-size", "20", "--backbone", "cnn",
            out=tmp_path)
    s = read_summary(tmp_path)
    assert s["scenario"] == "split_cifar" and s["setting"] == "class_il" and s["strategy"] == "naive"
    assert np.array(s["accuracy_matrix"]).shape == (5, 5)
    assert s["scenario_info"] == {"train_size": 200, "test_size": 100, "class_order": class_order(10, 3)}
    assert s["hparams"]["epochs"] == 20 and s["hparams"]["lr"] == 0.03   # the scenario's defaults for cnn
    assert s["steps"] == 5 * 2 * 20 and s["examples_seen"] == 200 * 20
    for key in ("acc", "bwt", "fwt", "forgetting", "memory", "wall_time"):
        assert key in s


def test_split_cifar_tasks_classes_and_shapes(cifar_root):
    opts = SplitCifarOptions(n_tasks=2, class_order_seed=5, train_per_class=7, test_per_class=3,
                             backbone="resnet18", backbone_width=8)
    sc = split_cifar(opts, RunOptions(data_root=str(cifar_root), setting="task_il", download=False))
    order = class_order(10, 5)
    assert [t.classes for t in sc.tasks] == [tuple(order[:5]), tuple(order[5:])]
    for t in sc.tasks:
        assert t.train.x.shape == (35, 3, 32, 32) and t.test.x.shape == (15, 3, 32, 32)
        assert sorted(t.train.y.tolist()) == sorted(list(range(5)) * 7)
        assert t.train.x.dtype == torch.float32 and abs(float(t.train.x.mean())) < 1.0   # normalised
    model = sc.make_model()
    assert [h.out_features for h in model.heads] == [5, 5] and model.backbone.conv1.out_channels == 8
    assert model(sc.tasks[1].test.x, 1).shape == (15, 5)
    # class_il keeps the global labels and one 10-way head.
    ci = split_cifar(opts, RunOptions(data_root=str(cifar_root), setting=None, download=False))
    assert ci.setting == "class_il" and set(ci.tasks[1].train.y.tolist()) == set(order[5:])
    assert [h.out_features for h in ci.make_model().heads] == [10]


def test_first_per_class_takes_the_first_in_file_order():
    y = torch.tensor([2, 0, 2, 1, 0, 2, 1, 0])
    assert first_per_class(y, 2).tolist() == [0, 1, 2, 3, 4, 6]
    assert first_per_class(y, 0).tolist() == list(range(8))


def test_crop_flip_matches_a_per_image_reference():
    x = torch.randn(16, 3, 32, 32)
    out = crop_flip(x, torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    dy, dx = torch.randint(0, 9, (16, 1), generator=g), torch.randint(0, 9, (16, 1), generator=g)
    flip = torch.rand(16, 1, generator=g) < 0.5
    padded = F.pad(x, (4, 4, 4, 4))
    flips = 0
    for i in range(16):              # the slow, obvious version
        ref = padded[i, :, dy[i, 0]:dy[i, 0] + 32, dx[i, 0]:dx[i, 0] + 32]
        if flip[i, 0]:
            ref, flips = ref.flip(-1), flips + 1
        assert torch.equal(out[i], ref)
    assert 0 < flips < 16
    assert torch.equal(crop_flip(x, torch.Generator().manual_seed(3)), out)


@pytest.mark.slow
def test_split_cifar_augment_runs_through_the_learner(cifar_root, tmp_path, capsys):
    proc = main_in_process(capsys, tmp_path, "--scenario", "split_cifar", "--data-root", str(cifar_root),
                           "--train-per-class", "10", "--test-per-class", "5", "--n-tasks", "2",
                           "--augment", "true", "--epochs", "1", "--setting", "task_il", "--backbone", "resnet18",
                           "--backbone-width", "4")
    assert proc.returncode == 0, proc.stderr
    s = read_summary(tmp_path)
    assert s["hparams"]["augment"] is True and s["setting"] == "task_il"
    assert np.array(s["accuracy_matrix"]).shape == (2, 2)


def _cifar_copy(src: Path, dst: Path) -> Path:
    folder = dst / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for f in (src / "cifar-10-batches-py").iterdir():
        (folder / f.name).symlink_to(f)
    return folder


def test_missing_cifar_file_exits_2_naming_it(cifar_root, tmp_path, capsys):
    folder = _cifar_copy(cifar_root, tmp_path / "data")
    (folder / "data_batch_3").unlink()
    out = tmp_path / "runs"
    proc = main_in_process(capsys, out, "--scenario", "split_cifar", "--data-root", str(tmp_path / "data"))
    assert_user_error(proc, out, "data_batch_3")
    assert "cifar-10-batches-py" in proc.stderr


def test_corrupt_cifar_file_exits_2_naming_it(cifar_root, tmp_path, capsys):
    folder = _cifar_copy(cifar_root, tmp_path / "data")
    (folder / "test_batch").unlink()
    (folder / "test_batch").write_bytes(b"\x80\x04garbage")
    out = tmp_path / "runs"
    proc = main_in_process(capsys, out, "--scenario", "split_cifar", "--data-root", str(tmp_path / "data"))
    assert_user_error(proc, out, "test_batch")


def test_empty_data_root_exits_2(tmp_path, capsys):
    out = tmp_path / "runs"
    proc = main_in_process(capsys, out, "--scenario", "split_cifar", "--data-root", str(tmp_path / "nothing"))
    assert_user_error(proc, out, "data_batch_1")
