"""Tasks and scenarios: what the engine streams to a strategy."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import torch

from clsim.config import opt
from clsim.errors import UserError
from clsim.models import TASK_HEADS

SETTINGS = ("class_il", "task_il", "domain_il")


@dataclass
class TaskData:
    """Supervised data of one split of a task: inputs and targets (as the task's head expects them)."""
    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return len(self.y)


@dataclass
class Source:
    """Who a task's training examples are: the population they come from and their ids in it.

    The privacy ledger composes accesses by individual: an id that recurs in several tasks pays
    for all of them (sequential composition); tasks with disjoint ids, or different populations,
    compose in parallel. `ids` None means the ids are unknown: every task naming the population
    is then assumed to hold all of its individuals."""
    population: str
    # The ids of the task's individuals (as built, row i of task.train is ids[i]; rows later moved
    # out, e.g. to validation or as audit canaries left out, stay listed: a superset is safe).
    ids: torch.Tensor | None = None


@dataclass
class Task:
    """One unit of the stream. Supervised tasks carry `train`/`test`; RL tasks carry `env`."""
    index: int
    name: str
    classes: tuple[int, ...] = ()
    train: TaskData | None = None
    test: TaskData | None = None
    val: TaskData | None = None          # held out of train by --val-fraction (clsim/protocol.py)
    env: Any = None                       # RL: an env description the RL learner understands
    n_outputs: int = 0                    # outputs of this task's head in task_il
    source: Source | None = None          # who the training examples are (see `individuals`)

    @property
    def dataset_id(self) -> str:
        """The name under which the privacy ledger accounts for this task's data."""
        return f"task{self.index}:{self.name}"

    @property
    def individuals(self) -> Source:
        """The declared source; otherwise RL tasks (fresh episodes from their own environment)
        are a population of their own, and supervised tasks that declare nothing are assumed
        to share every individual with each other (the cautious reading)."""
        if self.source is not None:
            return self.source
        if self.env is not None:
            return Source(f"episodes of {self.dataset_id}")
        return Source("undeclared training data")


#: what --epochs, --lr and --batch-size default to where a scenario declares nothing of its own
FALLBACK_RUN_DEFAULTS = {"epochs": 1, "lr": 0.01, "batch_size": 32}


class ScenarioOptions:
    """Base of a registered scenario's options dataclass: the defaults the scenario gives the run
    options --epochs, --lr and --batch-size (any other key defaults a strategy's option of that
    name, e.g. ewc_lambda) and --setting, declared once here. The builder puts `run_defaults()` in
    its Scenario's `defaults` and uses `setting_of(run)` (what a run uses); --help prints them
    without building anything."""
    RUN_DEFAULTS: ClassVar[dict] = {}
    SETTING: ClassVar[str] = "class_il"
    #: the option whose value changes `run_defaults()` (--help lists the defaults of each of its choices)
    DEFAULTS_DEPEND_ON: ClassVar[str | None] = None

    def run_defaults(self) -> dict:
        return {**FALLBACK_RUN_DEFAULTS, **self.RUN_DEFAULTS}

    def setting_of(self, run) -> str:
        """--setting if given, else this scenario's default setting."""
        return run.setting or self.SETTING


@dataclass
class SupervisedOptions(ScenarioOptions):
    """Base of the options of the supervised scenarios whose model is clsim.models.make_model's:
    the output-layer options, declared once (pass `task_heads=` on to make_model)."""
    task_heads: str = opt("separate", "task_il: separate (one linear head per task) or shared (ONE output layer "
                          "over every task's classes, a task's logits its own rows' outputs, as van de Ven & "
                          "Tolias's Task-IL code; penalties cover the whole layer, and under Adam "
                          "earlier tasks' rows keep moving on their moments)", choices=TASK_HEADS)


def class_split_options(classes: int, tasks: int, order: str, train: int, test: int, split: str = "",
                        test_images: str = "test images per class, the first ones in file order"):
    """The options base of an image scenario splitting `classes` classes into tasks: --n-tasks
    (default `tasks`), --class-order-seed (-1: `order`), --train-per-class (0: all `train`) and
    --test-per-class (0: all `test`). One definition; the help texts name the dataset's sizes."""
    @dataclass
    class ClassSplitOptions(SupervisedOptions):
        n_tasks: int = opt(tasks, f"number of tasks (the {classes} classes split evenly{split})", low=1, high=classes)
        class_order_seed: int = opt(-1, f"seed of a random class order (-1: {order})", low=-1)
        train_per_class: int = opt(0, f"training images per class, the first ones in file order (0: all {train})",
                                   low=0)
        test_per_class: int = opt(0, f"{test_images} (0: all {test})", low=0)
    return ClassSplitOptions


@dataclass
class Scenario:
    """A named, seeded, ordered list of tasks plus its setting and what to learn them with."""
    name: str
    setting: str
    tasks: list[Task]
    make_model: Callable[[], torch.nn.Module]   # backbone + head(s) for this setting
    defaults: dict = field(default_factory=dict)  # epochs, lr, batch_size suited to the scenario
    learner_cls: type | None = None               # None: SupervisedLearner
    learner_kwargs: dict = field(default_factory=dict)
    info: dict = field(default_factory=dict)      # recorded in summary.json (protocol, sizes)
    score_scale: float = 100.0                    # a perfect score: accuracy in %, 1 for normalised returns
    #: what the inputs are, for methods whose defaults depend on it (BLIP's F_prior): "digits",
    #: "natural_images", or None (undeclared: such a default must be given as an option)
    input_kind: str | None = None

    def __post_init__(self):
        self.defaults = {**FALLBACK_RUN_DEFAULTS, **self.defaults}

    def __iter__(self):
        return iter(self.tasks)

    def __len__(self) -> int:
        return len(self.tasks)


def class_split(x_train, y_train, x_test, y_test, class_order, n_tasks: int, setting: str,
                names: list[str] | None = None, population: str = "training set") -> list[Task]:
    """Split labelled data into `n_tasks` tasks of consecutive classes from `class_order`.

    class_il keeps global labels (one shared head over all classes). task_il and domain_il
    relabel each task's classes 0..k-1 in `class_order` order: in task_il the task id selects the
    task's head; in domain_il one shared head of k outputs serves every task and no task id is
    used (van de Ven et al. 2020's Domain-IL: "first or second digit?" on Split MNIST). Each task
    declares the rows of `x_train` it holds as its individuals in `population` (disjoint classes:
    disjoint individuals)."""
    class_order = [int(c) for c in class_order]
    if n_tasks < 1 or n_tasks > len(class_order):
        raise UserError(f"--n-tasks must be between 1 and {len(class_order)}, got {n_tasks}")
    groups = [list(map(int, g)) for g in torch.tensor(class_order).tensor_split(n_tasks)]
    tasks = []
    for i, classes in enumerate(groups):
        local = torch.full((max(class_order) + 1,), -1, dtype=torch.long)
        local[classes] = torch.arange(len(classes))
        parts, rows = [], []
        for x, y in ((x_train, y_train), (x_test, y_test)):
            rows.append(torch.nonzero(torch.isin(y, torch.tensor(classes))).squeeze(1))
            target = y[rows[-1]] if setting == "class_il" else local[y[rows[-1]]]
            parts.append(TaskData(x.index_select(0, rows[-1]), target))   # 6x a boolean mask's x[keep]
        label = names[i] if names else "-".join(map(str, classes))
        ids = rows[0]
        tasks.append(Task(i, label, tuple(classes), parts[0], parts[1], n_outputs=len(classes),
                          source=Source(population, ids)))
    return tasks


def single_head_width(tasks: list[Task], setting: str, n_classes: int) -> int:
    """Outputs of the one head class_il and domain_il share: every class label in class_il; in
    domain_il, where labels are renumbered within each task, the largest task's class count."""
    return max(t.n_outputs for t in tasks) if setting == "domain_il" else n_classes
