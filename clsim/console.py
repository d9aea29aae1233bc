"""What a run says on the console, in one place: the header line, a private run's ε (at each task's
end and at the end), the warnings when a requested ε cannot hold, and the final figures.
(clsim/loggers/progress.py prints the lines during a run, clsim/cli.py the final ones.)"""
from __future__ import annotations

from pathlib import Path


def header(hparams: dict, tasks: int, device: str, destination: Path | None, resume_step: int | None) -> str:
    """One line: what is being run, on what, and where it is written."""
    where = f"run directory {destination}" if destination is not None else "no run directory (out=None)"
    resumed = f" | resumed after step {resume_step}" if resume_step else ""
    return (f"clsim: scenario {hparams['scenario']} ({hparams['setting']}, {tasks} tasks) | strategy "
            f"{hparams['strategy']} | privacy {hparams['privacy']} | seed {hparams['seed']} | device {device} | "
            f"{where}{resumed}")


def epsilon(privacy: dict) -> str:
    """A private run's ε so far, from the ledger's report: the worst individual's, at its δ (∞, with
    the accesses that made it so, when a task's data were read outside the mechanism)."""
    if privacy["epsilon_worst"] is not None:
        return f"ε {privacy['epsilon_worst']:.3g} (worst individual, δ {privacy['delta']:g})"
    raw = sorted({a["purpose"] for d in privacy["datasets"].values() for a in d["accesses"]
                  if a["mechanism"] == "raw"})
    return f"ε ∞ (worst individual, δ {privacy['delta']:g}{': raw access, ' + '; '.join(raw) if raw else ''})"


def epsilon_warnings(strategy, mechanism, strategy_name: str) -> list[str]:
    """Why a private run's ε will be ∞ whatever --epsilon or --noise-multiplier say, known before
    it starts: the strategy reads task data outside the mechanism, the Fisher is raw, or figures
    read from the training data are logged."""
    reasons = []
    if strategy.data_access.startswith("raw"):
        reasons.append(f"strategy {strategy_name} {strategy.data_access.removeprefix('raw: ')}")
    if strategy.fisher_releases and getattr(mechanism.options, "fisher_privacy", None) == "raw":
        reasons.append("--fisher-privacy raw reads each task's Fisher exactly")
    if mechanism.logs_training_figures():
        reasons.append("--log-training-figures logs figures read from the training data")
    asked = getattr(mechanism.options, "epsilon", None)
    target = f"the requested ε {asked:g} cannot hold" if asked is not None else "its ε will be ∞"
    return [f"this {mechanism.name} run reads training data outside the mechanism, so {target} "
            f"for the individuals of those tasks: {reason}" for reason in reasons]


def summary(summary: dict, run_dir: Path | None) -> list[str]:
    """The lines a finished run ends with."""
    lines = [f"ACC {summary['acc']:.2f}  BWT {summary['bwt']:.2f}  FWT {summary['fwt']:.2f}  "
             f"forgetting {summary['forgetting']:.2f}"]
    if "task_aware" in summary:   # class_il: the same model with the task identity given at test time
        aware = summary["task_aware"]
        lines.append(f"task-aware ACC {aware['acc']:.2f}  BWT {aware['bwt']:.2f}  forgetting {aware['forgetting']:.2f}")
    if summary["privacy_mechanism"] != "none":
        lines.append(f"privacy: {epsilon(summary['privacy'])}")
    if run_dir is not None:
        lines.append(f"run directory: {run_dir}  (tensorboard --logdir {run_dir.parent})")
    return lines
