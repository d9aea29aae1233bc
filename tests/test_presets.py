"""Presets: shipped YAML protocols that resolve through the CLI's own validation, flags override them,
and BLIP's preset builds the authors' network and schedule."""
import json
from pathlib import Path

import pytest
import torch

from clsim import Experiment, cli, presets
from test_scenarios import digits_as_mnist


@pytest.fixture(scope="module")
def mnist_root(tmp_path_factory):
    return digits_as_mnist(tmp_path_factory.mktemp("mnist"))


def test_every_preset_resolves_with_its_options_and_cites_its_source():
    shipped = presets.all_presets()
    assert {"blip-mnist5", "blip-pmnist", "avalanche-pmnist-ewc", "mammoth-seqcifar10-derpp500",
            "sparcl-derpp-0.95"} <= set(shipped)
    assert sum(name.startswith("vdv-splitmnist-") for name in shipped) == 19   # 3 settings x 6 methods + iCaRL
    for name, preset in shipped.items():
        assert preset.paper and preset.table and preset.source.startswith("http")
        assert preset.published is None or 0 < preset.published <= 100
        e = cli.from_argv(["--preset", name])          # the CLI's validation of every value
        values = {**vars(e.run_options), **vars(e.protocol_options), **vars(e.scenario_options),
                  **vars(e.strategy_options), **(vars(e.mechanism_options) if e.mechanism_options else {})}
        for key, value in preset.options.items():
            if key in ("scenario", "strategy"):
                assert getattr(e, f"{key}_name") == value
            else:
                assert values[key] == value, (name, key)


def test_the_dplis_preset_selects_its_authors_form_and_network():
    """DPlis's dp_train.py sums each example's gradient over the K copies before clipping; its
    SmallCNN (model/model_dptrain.py) has 16 8x8 and 32 4x4 filters and 32 hidden units."""
    from clsim.models import DPlisCNN
    options = presets.get("dplis-mnist-smallcnn").options
    assert (options["strategy"], options["dplis_aggregate"], options["mnist_backbone"]) == ("dplis", "sum", "dplis_cnn")
    body = DPlisCNN(1, 28).body
    assert [tuple(m.weight.shape) for m in body if hasattr(m, "weight")] == [(16, 1, 8, 8), (32, 16, 4, 4), (32, 512)]


def test_presets_select_their_sources_forms_of_ewc_and_replay():
    """Mammoth's oEWC and Avalanche's EWC have no ½ in the penalty; Mammoth's Fisher weights each
    image's squared label gradient by p(label), over every image; SparCL's loop replays from task 1."""
    oewc = presets.get("mammoth-seqcifar10-oewc").options
    assert (oewc["ewc_penalty"], oewc["fisher"]) == ("full", "weighted") and oewc["fisher_samples"] >= 10000
    assert presets.get("avalanche-pmnist-ewc").options["ewc_penalty"] == "full"
    for sparsity in ("0.75", "0.90", "0.95"):
        assert presets.get(f"sparcl-derpp-{sparsity}").options["replay_from_task"] == 1


def test_flags_override_a_preset_and_list_shows_it(capsys):
    e = cli.from_argv(["--preset", "blip-mnist5", "--epochs", "3", "--lr", "0.05"])
    assert (e.run_options.epochs, e.run_options.lr, e.run_options.batch_size) == (3, 0.05, 64)
    assert e.protocol_options.lr_schedule == "plateau" and e.strategy_name == "blip"
    assert "--preset" not in e.as_argv() and "--lr-schedule" in e.as_argv()   # folded in
    assert Experiment(preset="blip-mnist5", epochs=3, lr=0.05).run_options == e.run_options   # same in Python
    assert cli.main(["--list"]) == 0
    out = capsys.readouterr().out
    assert "blip-mnist5" in out and "Table 1, MNIST-5 column" in out and "van de Ven" in out
    assert cli.main(["--preset", "blip-mnist5", "--strategy", "naive"]) == 2   # blip_* keys do not apply
    assert "preset blip-mnist5" in capsys.readouterr().err


@pytest.mark.slow
def test_blip_preset_runs_the_authors_network_and_plateau_schedule(mnist_root, tmp_path):
    e = cli.from_argv(["--preset", "blip-mnist5", "--data-root", str(mnist_root), "--train-per-class", "30",
                          "--test-per-class", "20", "--epochs", "12", "--lr-patience", "2",
                          "--out", str(tmp_path), "--checkpoint", "false"])
    result = e.run()
    run_dir, summary = result.run_dir, result.summary
    assert not (run_dir / "checkpoint.pt").exists()   # the flag, not the preset's default
    assert summary["setting"] == "task_il" and summary["hparams"]["lr_schedule"] == "plateau"
    tasks = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    tasks = [r for r in tasks if r["kind"] == "task"]
    assert all(1 <= r["schedule"]["epochs_run"] <= 12 for r in tasks)
    assert all(r["row"][r["task"]] > 70 for r in tasks)       # every task learned (2-way heads)
    # BLIP's network: one hidden layer of 1200, a 2-way head per task
    scenario = e.parties.scenario_entry.target(e.scenario_options, e.run_options)
    net = scenario.make_model()
    hidden = [m.out_features for m in net.backbone.body if isinstance(m, torch.nn.Linear)]
    assert hidden == [1200] and [h.out_features for h in net.heads] == [2] * 5
    # pixels standardised as BLIP's loaders do
    raw = cli.from_argv(["--preset", "blip-mnist5", "--data-root", str(mnist_root), "--train-per-class", "30",
                                "--mnist-standardise", "false"])
    raw_x = raw.parties.scenario_entry.target(raw.scenario_options, raw.run_options).tasks[0].train.x
    assert torch.allclose(scenario.tasks[0].train.x, (raw_x - 0.1307) / 0.3081)
    # validation on the training set is recorded as a read of each task's data
    for dataset in summary["privacy"]["datasets"].values():
        assert any(a["purpose"].startswith("validation") for a in dataset["accesses"])


def load_reproduce():
    import importlib.util
    spec = importlib.util.spec_from_file_location("reproduce", Path(__file__).parent.parent / "bench" / "reproduce.py")
    reproduce = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(reproduce)
    return reproduce


def test_reproduce_budget_scales_memories_and_names_schedules_that_cannot_act():
    reproduce = load_reproduce()
    er = presets.get("mammoth-seqcifar10-er500")
    # a buffer keeps its published share of the stream: 500 of 50,000 images, 15 of 1,500 at 0.03
    assert reproduce.budget_flags(er, 0.03) == ["--epochs", "2", "--train-per-class", "150", "--test-per-class",
                                                "100", "--replay-size", "15"]
    assert reproduce.budget_flags(presets.get("mammoth-seqcifar10-gem500"), 0.001)[-2:] == ["--gem-memory", "1"]
    assert reproduce.budget_flags(er, 1.0) == [] and reproduce.budget_notes(er, 0.03) == []
    sparcl = presets.get("sparcl-derpp-0.75")
    assert reproduce.budget_notes(sparcl, 1.0) == []                     # 50 epochs: every schedule acts
    assert reproduce.budget_notes(sparcl, 0.03) == [
        "SparCL masks: one update per task, at its start, without regrowth (every 5 epochs, 2 a task)",
        "SparCL data removal: 0 of 4 rounds (every 5 epochs, 2 a task)"]
    assert reproduce.budget_notes(sparcl, 0.3) == ["SparCL data removal: 2 of 4 rounds (every 5 epochs, 15 a task)"]


@pytest.mark.slow
def test_reproduce_budget_scales_epochs_and_data_and_runs_a_preset(mnist_root, tmp_path, capsys):
    reproduce = load_reproduce()
    vdv = presets.get("vdv-splitmnist-task-none")
    assert reproduce.budget_flags(vdv, 1.0) == []                  # the published protocol unchanged
    assert reproduce.budget_flags(vdv, 0.1) == ["--epochs", "2", "--train-per-class", "600",
                                                "--test-per-class", "100"]
    assert reproduce.main(["--preset", "vdv-splitmnist-task-none", "--budget", "0.02", "--seeds", "0,1",
                           "--data-root", str(mnist_root), "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "vdv-splitmnist-task-none" in out and "87.19" in out and "±" in out
    result = json.loads((tmp_path / "reproduce.json").read_text())[0]
    assert result["published"] == 87.19 and len(result["runs"]) == 2
    assert result["mean"] == pytest.approx(sum(r["acc"] for r in result["runs"]) / 2)


def test_preset_files_ship_as_package_data():
    from importlib import resources
    from setuptools.config.setupcfg import read_configuration
    cfg = read_configuration(str(Path(__file__).parent.parent / "setup.cfg"))
    assert "*.yaml" in cfg["options"]["package_data"]["clsim.presets"]
    shipped = {p.name for p in resources.files("clsim.presets").iterdir() if p.name.endswith(".yaml")}
    assert shipped >= {"avalanche.yaml", "blip.yaml", "mammoth.yaml", "sparcl.yaml", "vandeven2019.yaml"}


def test_published_task_il_figures_are_read_strictly_and_listed():
    er = presets.get("mammoth-seqcifar10-er500")
    assert (er.published, er.published_task_il) == (57.74, 93.61)   # DER Table 2 via Co2L Table 1
    assert presets.get("vdv-splitmnist-task-none").published_task_il is None
    assert "(published ACC 57.74, Task-IL 93.61)" in "\n".join(presets.listing())
    doc = {"paper": "P", "source": "https://x", "metric": "acc", "train_per_class": 10,
           "common": {"scenario": "split_digits", "setting": "class_il"}}

    def read(**entry):
        return presets.parse({**doc, "presets": {"p": {"table": "T", "published": 50, "options": {}, **entry}}}, "f.yaml")

    assert read(published_task_il=90)[0].published_task_il == 90.0
    for bad in ("93.6", True, 0, 101, [90]):   # text, a flag, out of (0, 100], a list: refused
        with pytest.raises(ValueError, match="f.yaml, preset p: published_task_il must be a percentage"):
            read(published_task_il=bad)
    with pytest.raises(ValueError, match="published must be a percentage"):
        read(published="57.74")
    with pytest.raises(ValueError, match="Task-IL column of a class_il run; this preset's setting is task_il"):
        read(published_task_il=90, options={"setting": "task_il"})
    with pytest.raises(ValueError, match="keys"):   # a misspelt key is not silently ignored
        read(published_taskil=90)


@pytest.mark.slow
def test_reproduce_records_the_task_aware_acc_of_class_il_presets(mnist_root, tmp_path, capsys):
    reproduce = load_reproduce()
    assert reproduce.main(["--preset", "vdv-splitmnist-class-none", "--preset", "vdv-splitmnist-domain-none",
                           "--budget", "0.01", "--seeds", "0", "--data-root", str(mnist_root),
                           "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    class_il, domain_il = json.loads((tmp_path / "reproduce.json").read_text())
    run = class_il["runs"][0]
    summary = json.loads(next((tmp_path / "vdv-splitmnist-class-none").glob("*/summary.json")).read_text())
    assert run["task_aware_acc"] == summary["task_aware"]["acc"] >= run["acc"]
    assert class_il["task_aware"] == {"published": None, "mean": run["task_aware_acc"], "sd": 0.0, "gap": None}
    assert f"task-aware: measured {run['task_aware_acc']:.2f}, published Task-IL not given" in out
    assert "task_aware" not in domain_il and "task_aware_acc" not in domain_il["runs"][0]
    # beside a published Task-IL figure: the gap to it
    figures = reproduce.comparison([90.0, 92.0], presets.get("mammoth-seqcifar10-er500").published_task_il)
    assert figures["gap"] == pytest.approx(91.0 - 93.61)
    assert reproduce.task_aware_line([90.0, 92.0], figures) == \
        "  task-aware: measured 91.00 ± 1.41, published Task-IL 93.61, gap -2.61"
