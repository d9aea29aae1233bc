"""Private continual learning, end to end: EWC on split digits with and without DP-SGD at a total
budget of ε = 3, then what the privacy ledger says about each group of individuals.

    python examples/private_continual_learning.py [--epochs 3] [--epsilon 3] [--out runs]

Under `privacy="dpsgd"` every training step and every Fisher release (EWC's importance) is composed
for the individuals it touches; `--epsilon` is the whole budget of the worst-off individual.
"""
import argparse

from clsim import Experiment


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--epsilon", type=float, default=3.0)
    p.add_argument("--out", default="runs")
    args = p.parse_args()

    common = dict(scenario="split_digits", strategy="ewc", setting="task_il", epochs=args.epochs, seed=0,
                  out=args.out)
    plain = Experiment(**common).run()
    private = Experiment(**common, privacy="dpsgd", epsilon=args.epsilon).run()

    for name, result in (("no privacy", plain), (f"DP-SGD, ε = {args.epsilon:g}", private)):
        print(f"{name:>16}: ACC {result.acc:5.1f}  BWT {result.summary['bwt']:6.1f}  -> {result.run_dir}")
    ledger = private.summary["privacy"]
    print(f"worst-off individual: ε = {ledger['epsilon_worst']:.3f}")
    for group in ledger["individuals"]:
        print(f"  {group['count']:5d} individuals of {group['population']} in tasks {group['tasks']}: "
              f"ε = {group['epsilon']:.3f} over {len(group['accesses'])} accesses")


if __name__ == "__main__":
    main()
