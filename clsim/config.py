"""Typed options: dataclass fields carry their documentation and bounds.

Every strategy and scenario owns one small dataclass built from `opt(...)` fields; the CLI
flags, `--help`, YAML configs (`load_yaml`), validation and the TensorBoard hparams table all
come from it.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
import typing
from dataclasses import dataclass, field
from typing import Any

import yaml

from clsim.download import default_data_root
from clsim.errors import UserError


class OptionError(UserError):
    """A bad value of one named option (`name`), so a caller can say where it came from."""

    def __init__(self, name: str, message: str):
        super().__init__(message)
        self.name = name


def opt(default: Any, help: str, *, low: float | None = None, high: float | None = None,
        low_open: bool = False, choices: tuple | None = None):
    """A documented option. `low`/`high` bound numbers (`low_open` excludes `low` itself)."""
    meta = {"help": help, "low": low, "high": high, "low_open": low_open, "choices": choices}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


def redefault(base, name: str, default: Any):
    """A field for a subclass of options class `base`: `name` keeps its documentation and bounds
    (documented once) and takes a new default."""
    return field(default=default, metadata=base.__dataclass_fields__[name].metadata)


def redefaults(base, **defaults):
    """Options class `base` with new defaults for the fields named (each keeps its documentation and
    bounds): the base of a subclass that retunes inherited options, e.g. a scenario's PPO settings."""
    hints = typing.get_type_hints(base)
    return dataclasses.make_dataclass(base.__name__, [(name, hints[name], redefault(base, name, value))
                                                     for name, value in defaults.items()], bases=(base,))


def load_yaml(path: str | os.PathLike) -> dict:
    """A YAML file of option: value pairs (keys are option or flag names). Parsed with a safe loader
    (loading never runs code) that refuses a key given twice, as the command line refuses a flag
    given twice (YAML itself would keep the last)."""
    try:
        with open(path, encoding="utf-8") as f:
            data = load_yaml_unique(f)
    except OSError as exc:
        raise UserError(f"cannot read config file {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise UserError(f"config file {path} is not UTF-8 text; write option: value lines") from None
    except DuplicateKeyError as exc:
        raise UserError(f"config file {path} {exc}; keep one") from None
    except yaml.YAMLError as exc:
        raise UserError(f"config file {path} is not valid YAML ({type(exc).__name__})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"config file {path} must be a mapping of option names to values")
    empty = [str(k) for k, v in data.items() if v is None]
    if empty:   # `epochs:` with nothing after it: a slip, not a request for the default
        raise UserError(f"config file {path} gives {empty[0]} no value; give one or remove the line")
    out, spelled = {}, {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name in out:   # batch-size and batch_size are one option
            raise UserError(f"config file {path} gives {name} twice (as {spelled[name]} and {key}); keep one")
        out[name], spelled[name] = value, key
    return out


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


#: the bound of every integer option that states none: no count in a run comes near it, and past
#: it values overflow the C integers of torch and numpy (a traceback, or a silent wrap)
INT_HIGH = 2**31 - 1
#: the bound of every float option that states none: float32's largest value, past which a figure cannot
#: meet the float32 tensors it scales (torch refused to convert --lr 1e308: a traceback)
FLOAT_HIGH = 3.4028234663852886e38


def validate(options) -> None:
    """Check every field of an options dataclass against its bounds; raise UserError."""
    for f in dataclasses.fields(options):
        value = getattr(options, f.name)
        meta = f.metadata
        if value is None:
            continue
        if meta.get("choices") and value not in meta["choices"]:
            raise OptionError(f.name, f"{flag(f.name)} {value!r} is not one of: "
                                      f"{', '.join(map(str, meta['choices']))}")
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if isinstance(value, float) and not math.isfinite(value):
                raise OptionError(f.name, f"{flag(f.name)} must be a finite number, got {value}")
            low, high = meta.get("low"), meta.get("high")
            if high is None:
                high = INT_HIGH if isinstance(value, int) else FLOAT_HIGH
            if low is not None and (value < low or (meta.get("low_open") and value == low)):
                rel = ">" if meta.get("low_open") else ">="
                raise OptionError(f.name, f"{flag(f.name)} must be {rel} {low}, got {value}")
            if high is not None and value > high:
                raise OptionError(f.name, f"{flag(f.name)} must be <= {high}, got {value}")


def add_arguments(parser, options_cls, group_title: str, defaults: dict | None = None) -> None:
    """Add one CLI flag per field of `options_cls`. Flags are read as text and default to None
    (not given): `build` converts and checks them, so a flag, a YAML key and a Python keyword
    argument go through the same code and fail with the same message. `defaults` (name -> text)
    replaces the default --help names, for options whose default another party sets."""
    group = parser.add_argument_group(group_title)
    hints = typing.get_type_hints(options_cls)
    for f in dataclasses.fields(options_cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        kind = _scalar_type(hints[f.name])
        choices = f.metadata.get("choices")
        metavar = "{" + ",".join(map(str, choices)) + "}" if choices else f.name.upper()
        help_text = f.metadata.get("help", "")
        if defaults and f.name in defaults:   # in place of the help's own "(default: ...)", if it has one
            given = f"(default: {defaults[f.name]})"
            help_text = re.sub(r"\(default: [^)]*\)", lambda m: given, help_text, count=1) \
                if "(default:" in help_text else f"{help_text} {given}"
        elif "(default:" not in help_text:   # a help that names its own default knows it better than None
            help_text += f" (default: {'none' if default is None else default})"
        group.add_argument(flag(f.name), dest=f.name, default=None, metavar=metavar,
                           help=help_text.replace("%", "%%"))   # argparse formats help with %


def _scalar_type(hint) -> type:
    """int, float, str or bool from an annotation such as `float` or `int | None`."""
    for kind in (bool, int, float, str):
        if hint is kind or kind in typing.get_args(hint):
            return kind
    raise TypeError(f"unsupported option type {hint}")


def parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError(text)


_KIND_NAMES = {bool: "true or false", int: "a whole number", float: "a number", str: "text"}


def coerce(name: str, value: Any, hint) -> Any:
    """`value` as the field's type: text (a flag, or a YAML string) is parsed; a typed value (YAML,
    Python) must already be of that type (an int is taken for a float). Raises UserError."""
    kind = _scalar_type(hint)
    if isinstance(value, str) and not value.strip():
        raise OptionError(name, f"{flag(name)} is empty; give it a value or leave it out")
    if isinstance(value, str) and kind is not str:
        try:
            return parse_bool(value) if kind is bool else kind(value)
        except ValueError:
            raise OptionError(name, f"{flag(name)} must be {_KIND_NAMES[kind]}, got {value!r}") from None
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        raise OptionError(name, f"{flag(name)} must be {_KIND_NAMES[kind]}, got {value!r}")
    return value


def fields(options_cls) -> list[str]:
    """The option names of an options dataclass (none for None)."""
    return [] if options_cls is None else [f.name for f in dataclasses.fields(options_cls)]


def build(options_cls, values: dict):
    """Instantiate `options_cls` from the given values (None means 'not given'; other keys are
    ignored), each converted to its field's type, then validate the bounds."""
    hints = typing.get_type_hints(options_cls)
    given = {k: coerce(k, values[k], hints[k]) for k in fields(options_cls)
             if values.get(k) is not None}
    options = options_cls(**given)
    validate(options)
    return options


@dataclass
class RunOptions:
    """Options every run has, whatever the scenario and strategy."""
    epochs: int | None = opt(None, "training epochs per task (default: the scenario's)", low=1)
    lr: float | None = opt(None, "learning rate (default: the scenario's)", low=0.0, low_open=True)
    batch_size: int | None = opt(None, "mini-batch size (default: the scenario's)", low=1)
    momentum: float = opt(0.0, "SGD momentum", low=0.0, high=0.999)
    seed: int = opt(0, "one seed for everything: data order, initialisation, sampling", low=0, high=2**32 - 1)
    setting: str | None = opt(None, "class_il, task_il or domain_il (default: the scenario's)",
                       choices=("class_il", "task_il", "domain_il"))
    data_root: str = opt(default_data_root(), "directory holding the datasets; one that is missing is "
                         "downloaded there (docs/datasets.md)")
    download: bool | None = opt(None, "download a missing dataset's official files, checksum verified "
                                "(default: true, false when CLSIM_NO_DOWNLOAD=1); --no-download is --download false")
    data_mirror: str | None = opt(None, "fetch the official files from this URL (a folder holding them) instead "
                                  "of their publishers' servers; still checked against the official checksums")
    out: str = opt("runs", "directory under which the run directory is created")
    privacy: str | None = opt(None, "train any strategy under a privacy mechanism (e.g. dpsgd, dplis) "
                              "(default: the strategy's own: none but for the dpsgd and dplis strategies)")
    device: str = opt("cpu", "torch device, e.g. cpu or cuda")
    compile: bool = opt(False, "train through torch.compile(model) (supervised, no privacy mechanism; "
                        "else, or if it fails, eagerly, said on stderr)")
    precision: str = opt("32", "32 (float32) or bf16-mixed (bfloat16 autocast of the training forward; "
                         "supervised, no privacy mechanism)", choices=("32", "bf16-mixed"))
    progress: bool | None = opt(None, "show a progress bar (default: only when attached to a terminal)")
    checkpoint: bool = opt(True, "write a checkpoint at every task boundary")
    workers: int = opt(1, "data-parallel worker processes (each batch split over them; gloo on CPU, one GPU "
                       "each with --device cuda), on this machine or with --address on a Ray cluster; "
                       "see docs/distributed.md", low=1)
    address: str | None = opt(None, "run the --workers on the Ray cluster at this address (ray://host:port, "
                              "auto, or local) through Ray Train")
    loggers: str = opt("tensorboard,jsonl", "comma-separated loggers: tensorboard (tb/), jsonl (log.jsonl), "
                       "csv (steps.csv, tasks.csv, matrix.csv), or a plugin's (entry-point group clsim.loggers)")


SCHEDULES = ("constant", "plateau", "cosine", "step")


@dataclass
class ProtocolOptions:
    """How each task is trained: optimizer, learning-rate schedule, validation split (clsim/protocol.py)."""
    optimizer: str = opt("sgd", "sgd (with --momentum) or adam (betas 0.9, 0.999)", choices=("sgd", "adam"))
    optimizer_reset: bool = opt(True, "a fresh optimizer for every task; false keeps one, and its state (Adam's "
                                "moments, SGD's momentum), across tasks, as van de Ven's code does unless "
                                "--optimizer adam_reset (the learning-rate schedule restarts with every task either way)")
    active_classes: bool = opt(False, "class_il: the training loss's softmax, and the Fisher's, span only the "
                               "classes of the tasks trained so far (van de Ven's 'active classes'), not every "
                               "output unit; evaluation always chooses among all of them")
    lr_schedule: str = opt("constant", "per-epoch learning-rate schedule within each task: constant, "
                           "plateau (divide on no validation improvement, stop at --lr-min, restore "
                           "the best weights: HAT/BLIP), cosine or step (Mammoth)", choices=SCHEDULES)
    lr_patience: int = opt(5, "plateau: epochs without validation improvement before the lr is divided", low=1)
    lr_factor: float = opt(3.0, "plateau and step: divide the lr by this", low=1.0, low_open=True)
    lr_min: float = opt(1e-4, "plateau: stop the task once the lr falls below this", low=0.0)
    lr_milestones: str = opt("", "step: epochs (within each task) at which the lr is divided, e.g. 35,45")
    warmup_epochs: int = opt(0, "cosine, step or constant: epochs of linear warm-up from lr/(w+1)", low=0)
    val_fraction: float = opt(0.0, "hold out this share of each task's training set for validation "
                              "(0: the plateau schedule validates on the training set, as BLIP's "
                              "code does)", low=0.0, high=0.9)



class DuplicateKeyError(yaml.YAMLError):
    """A YAML mapping that gives one key twice (`load_yaml_unique`)."""


class _UniqueKeyLoader(yaml.SafeLoader):
    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":   # <<: *base may override on purpose
                continue
            key, line = self.construct_object(key_node, deep=deep), key_node.start_mark.line + 1
            try:
                if key in seen:
                    raise DuplicateKeyError(f"gives {key} twice (lines {seen[key]} and {line})")
                seen[key] = line
            except TypeError:   # an unhashable key: the base class refuses it
                pass
        return super().construct_mapping(node, deep)


def load_yaml_unique(stream):
    """yaml.safe_load (loading never runs code), refusing a mapping that gives one key twice: YAML
    would keep the last silently, where the same flag given twice is refused."""
    return yaml.load(stream, Loader=_UniqueKeyLoader)
