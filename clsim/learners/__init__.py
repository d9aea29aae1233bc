"""Learners: the model and its objective, the only part that differs between supervised and RL.

A learner offers what strategies need, and nothing else:
  make_optimizer()                 a fresh optimiser for a task
  batches(task, epoch, subset)     the training batches of one epoch (subset: example indices)
  forward(batch) -> (losses, out)  per-example losses and the model's outputs
  evaluate(task) -> float          accuracy in % (supervised) or mean return (RL)
  fisher_batches(task, n, empirical) and logits(x, t)
                                   data and the scores behind p(y|x) for Fisher-based strategies
  is_head(name)                    whether a parameter belongs to a task head
Optional: step_metrics() (figures per step), score_details() (e.g. raw RL returns recorded
as extra matrices beside the score matrix) and task_aware_scores() (class_il: the same evaluation's
outputs scored with the task identity given; the supervised learner records them in `accuracy`).
"""
from clsim.learners.base import Batch, Learner, to_device  # noqa: F401
