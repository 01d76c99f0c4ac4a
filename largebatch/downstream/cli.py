"""Downstream evaluation of a pretrained checkpoint: one fixed fine-tuning recipe, reported beside the
same recipe from a random initialisation (what pretraining bought).

    lb-finetune RUN_DIR [RUN_DIR ...] [--task tweets] [--random-init] [--squad-train F --squad-dev F]

Each RUN_DIR gets ``downstream.json`` (and ``downstream_random.json`` with --random-init; SQuAD adds
``*_predictions.json``), which ``lb-report`` reads. User errors print one ``error:`` line and exit 2.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from largebatch.data.squad import load_squad
from largebatch.downstream.classify import finetune_classification
from largebatch.downstream.pretrained import checked_model_dir
from largebatch.downstream.squad import finetune_squad
from largebatch.errors import ConfigError, LargebatchError, fail
from largebatch.runfolder import DOWNSTREAM


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lb-finetune", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR", help="pretraining run folder(s)")
    parser.add_argument("--task", default="tweets", help="bundled classification task (tweets, wiki_topics)")
    parser.add_argument("--random-init", action="store_true",
                        help="also fine-tune the same config from random weights (-> downstream_random.json)")
    parser.add_argument("--squad-train", type=Path, help="SQuAD v1.1 train JSON: fine-tune on SQuAD instead")
    parser.add_argument("--squad-dev", type=Path, help="SQuAD v1.1 dev JSON (with --squad-train)")
    parser.add_argument("--out", default=DOWNSTREAM, help="file name written inside each RUN_DIR")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=float, help="default: 1 (classification), 3 (SQuAD)")
    parser.add_argument("--lr", type=float, help="default: 1e-4 (classification), 5e-5 (SQuAD)")
    parser.add_argument("--batch", type=int, help="default: 32")
    parser.add_argument("--max-train", type=int, help="first N training examples (classification: 8000)")
    parser.add_argument("--max-eval", type=int, help="first N eval examples (classification: 2000)")
    # 1 by default: on the shared 2-core box, 2 threads ran 4-9x slower (oversubscribed), same accuracy.
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1; 0 = torch's)")
    return parser


def _check_inputs(args) -> None:
    """Every input error before the first fine-tune, not minutes into a batch of runs."""
    if bool(args.squad_train) != bool(args.squad_dev):
        raise ConfigError("--squad-train and --squad-dev go together; give both files")
    for path in (args.squad_train, args.squad_dev):
        if path is not None and not path.is_file():
            load_squad(path)  # raises the DataNotFoundError that says where SQuAD comes from
    for run_dir in args.run_dirs:
        checked_model_dir(run_dir / "model")


def _finetune_run(run_dir: Path, args, init: str) -> dict:
    # Only what the user set: the functions' defaults are the recipe for their task.
    common = {"init": init, "seed": args.seed, "threads": args.threads}
    common.update({k: v for k in ("epochs", "lr", "batch", "max_train", "max_eval")
                   if (v := getattr(args, k)) is not None})
    if args.squad_train:
        return finetune_squad(run_dir / "model", args.squad_train, args.squad_dev, **common)
    return finetune_classification(run_dir / "model", task=args.task, **common)


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    try:
        _check_inputs(args)
        from largebatch.tracking import environment

        out = Path(args.out)
        for run_dir in args.run_dirs:
            targets = [("pretrained", run_dir / out)]
            if args.random_init:
                targets.append(("random", run_dir / f"{out.stem}_random{out.suffix}"))
            for init, path in targets:
                result = _finetune_run(run_dir, args, init)
                if "predictions" in result:
                    path.with_name(f"{path.stem}_predictions.json").write_text(
                        json.dumps(result.pop("predictions"), indent=1))
                result.update(run_dir=str(run_dir), environment=environment())
                path.write_text(json.dumps(result, indent=2) + "\n")
                score = result.get("f1", math.nan) if args.squad_train else 100 * result["accuracy"]
                print(f"{run_dir} [{init}]: {'F1' if args.squad_train else 'accuracy'} {score:.2f} "
                      f"in {result['seconds']:.1f} s -> {path}")
    except LargebatchError as error:
        fail(error)
