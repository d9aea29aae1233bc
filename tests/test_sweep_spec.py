"""Sweep specs checked before anything runs (no Ray needed): names confined to --out, trial counts
bounded, duplicate keys refused, and the status lines of trials that did not finish."""
from __future__ import annotations

import json

import pytest

from clsim import sweep
from clsim.errors import UserError


def spec_file(tmp_path, text: str):
    path = tmp_path / "spec.yaml"
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("name", ["../../escape", "..", "/tmp/elsewhere", "a/b", ""])
def test_a_sweep_name_cannot_leave_the_sweep_root(tmp_path, name):
    spec = spec_file(tmp_path, f"name: {json.dumps(name)}\ngrid: {{seed: [0]}}\n")
    with pytest.raises(UserError, match="must be one directory name .no '/', not '..'.: the sweep is written to "
                                        "--out/<name>"):
        sweep.sweep(spec, str(tmp_path / "out"))
    assert [p.name for p in tmp_path.iterdir()] == ["spec.yaml"] and not (tmp_path.parent / "escape").exists()


def test_a_grid_above_max_trials_is_refused_unless_allowed(tmp_path):
    axes = ", ".join(f"a{i}: [{', '.join(map(str, range(10)))}]" for i in range(7))   # 10^7 trials
    spec = spec_file(tmp_path, f"name: big\ngrid: {{{axes}}}\n")
    with pytest.raises(UserError, match=f"makes 10000000 trials, more than --max-trials {sweep.MAX_TRIALS}; "
                                        f"check its grid and random.samples, or pass --max-trials 10000000"):
        sweep.sweep(spec, str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()
    small = spec_file(tmp_path, "name: s\ngrid: {seed: [0, 1, 2]}\nrandom: {samples: 400, space: {lr: {uniform: [0.1, 1]}}}\n")
    with pytest.raises(UserError, match="makes 1200 trials, more than --max-trials 1000"):
        sweep.sweep(small, str(tmp_path / "out"))
    assert sweep.check_trial_count(sweep.load_spec(small), small, max_trials=1200) == 1200   # allowed

@pytest.mark.parametrize("text", ["base: {out: elsewhere}\n", "grid: {progress: [true, false]}\n"])
def test_a_spec_cannot_set_what_the_sweep_sets_for_each_trial(tmp_path, text):
    spec = spec_file(tmp_path, "name: mine\n" + text)
    with pytest.raises(UserError, match=r"sets (out|progress), which clsim sweep sets for each trial .* remove it"):
        sweep.sweep(spec, str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_duplicate_keys_in_a_spec_are_refused(tmp_path):
    spec = spec_file(tmp_path, "name: d\ngrid: {seed: [0]}\nbase:\n  epochs: 1\n  lr: 0.1\n  epochs: 3\n")
    with pytest.raises(UserError, match=r"spec.yaml gives epochs twice \(lines 4 and 6\); keep one"):
        sweep.load_spec(spec)


def test_trials_that_did_not_finish_point_only_at_files_that_exist(tmp_path, capsys):
    """After a Ctrl-C the unfinished trials were said to have errors in tune/<id>/error.txt, which
    did not exist."""
    resolved = [{"strategy": s, "seed": 0} for s in ("naive", "ewc", "er")]
    ids = [sweep.trial_id(o) for o in resolved]
    (tmp_path / "trials" / ids[0]).mkdir(parents=True)
    (tmp_path / "trials" / ids[0] / "error.txt").write_text("--lr must be > 0.0, got 0.0\n")
    (tmp_path / "trials" / ids[1] / ".run.partial").mkdir(parents=True)   # stopped mid-run
    (tmp_path / "tune" / ids[2]).mkdir(parents=True)
    (tmp_path / "tune" / ids[2] / "error.txt").write_text("Traceback ...")   # Ray's own record
    assert sweep._write_status(tmp_path, resolved) == 3
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == f"trial {ids[0]} failed: --lr must be > 0.0, got 0.0"
    assert lines[1] == (f"trial {ids[1]} not run: it did not run to its end (the sweep was stopped?); "
                        f"run the same command again to run it")
    assert lines[2] == f"trial {ids[2]} not run: see {tmp_path / 'tune' / ids[2] / 'error.txt'}"
    status = json.loads((tmp_path / "sweep.json").read_text())
    assert [s["status"] for s in status] == ["failed", "not run", "not run"]


def test_clsim_sweep_refuses_a_large_grid_in_one_line_before_ray_starts(tmp_path, capsys):
    from clsim import cli
    spec = spec_file(tmp_path, "name: big\ngrid: {seed: [0, 1, 2, 3]}\n")
    assert cli.main(["sweep", spec, "--out", str(tmp_path / "out"), "--max-trials", "3"]) == 2
    assert capsys.readouterr().err.strip() == (f"error: sweep spec {spec} makes 4 trials, more than --max-trials 3; "
                                               f"check its grid and random.samples, or pass --max-trials 4 to run "
                                               f"them all")
    assert cli.main(["sweep", spec, "--max-trials", "0"]) == 2
    assert "--max-trials must be between 1 and 2147483647, got 0" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
