"""Ship the final models of a finished run as the repository's trained ensemble, with its model card.

    python scripts/ship_ensemble.py RUN --commit SHA --trained-on TEXT --minutes M [--again RUN2] [--name NAME]
    python scripts/ship_ensemble.py --card-only [--name NAME]       # the card again, from the shipped files

Copies RUN's config.json and split<k>/final.pt into weights/NAME/ with the sha256 of each
(paraisite.screening.shipped), scores them (paraisite.evaluation.card: each split's model on its
validation part, every model on Miyazaki2021), refuses a run with a collapsed model (a prediction
<= 0 W/m/K or Spearman <= 0.8 on its validation part), and writes card.json and README.md.
--again RUN2 (the same commands run a second time) records whether RUN2's models are RUN's bit for bit.
"""
from __future__ import annotations

import argparse
import json
import shlex
import shutil
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from paraisite.checkpoint import read_model_checkpoint  # noqa: E402
from paraisite.evaluation.card import candidate_choice, card_figures, render_card, unhealthy  # noqa: E402
from paraisite.screening.shipped import DEFAULT_NAME, WEIGHTS, check_shipped, write_shipped  # noqa: E402
from paraisite.training.loop import TrainConfig  # noqa: E402
from paraisite.training.rundir import RunDir  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SEARCH_CSV = ROOT / "docs" / "results" / "recipe_search.splits.csv"


def train_command(config: dict) -> str:
    """The train.py command that trains a run of these settings (its default run folder)."""
    settings = TrainConfig(**{k: v for k, v in config.items() if k in TrainConfig.__dataclass_fields__})
    flags = [f"--init {settings.init}", f"--dataset {settings.dataset}"]
    flags += [f"--{k.replace('_', '-')} {v:g}" if isinstance(v, float) else f"--{k.replace('_', '-')} {v}"
              for k, v in settings.off_paper().items()]
    return "python train.py " + " ".join(flags)


def recipe(config: dict) -> str:
    c = TrainConfig(**{k: v for k, v in config.items() if k in TrainConfig.__dataclass_fields__})
    loss = {"log10": "the error of log10(LTC + 1)", "mape": "MAPE in W/m/K (the paper's)"}[c.loss]
    clip = f", each step's gradient clipped to norm {c.clip_grad_norm:g}" if c.clip_grad_norm else ""
    return (f"MEGNet from matgl's formation-energy weights (`--init {c.init}`), trained with its MLP head on the whole "
            f"training part of each split: loss {loss}{clip}; Adam, learning rate {c.lr:g} (cosine annealing), batch "
            f"{c.batch_size}, {c.epochs} epochs, seed {c.seed}, cutoff {c.cutoff:g} Å. See docs/training.md.")


def compare_runs(shipped: Path, again: Path, splits: list[int]) -> str:
    """Whether the models of ``again`` are those of the shipped ensemble, bit for bit."""
    worst, same = 0.0, 0
    for k in splits:
        a = read_model_checkpoint(shipped / f"split{k}" / "final.pt")["state_dict"]
        b = read_model_checkpoint(RunDir(again).checkpoint(k, "final"))["state_dict"]
        diff = max(float((a[n].double() - b[n].double()).abs().max()) if a[n].numel() else 0.0 for n in a)
        same += all(torch.equal(a[n], b[n]) for n in a)
        worst = max(worst, diff)
    if same == len(splits):
        return (f"Trained twice with these commands (the second time in `{again}`): the {len(splits)} models came "
                "out bit for bit the same (every tensor equal).")
    return (f"Trained twice with these commands (the second time in `{again}`): {same} of {len(splits)} models bit "
            f"for bit the same; largest difference of a weight {worst:.3g}.")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", nargs="?", help="finished run folder (train.py's)")
    p.add_argument("--name", default=DEFAULT_NAME, help="folder under weights/ (default: %(default)s)")
    p.add_argument("--commit", help="the commit the run was trained at")
    p.add_argument("--trained-on", help="the machine, processes and threads, e.g. '2-core CPU, 2 processes x 1 thread'")
    p.add_argument("--minutes", type=float, help="wall time of the training")
    p.add_argument("--again", help="the same commands' second run, compared bit for bit")
    p.add_argument("--card-only", action="store_true", help="recompute and rewrite the card of the shipped ensemble")
    args = p.parse_args(argv)
    out = WEIGHTS / args.name
    if args.card_only:
        card = json.loads((out / "card.json").read_text())
    else:
        if not (args.run and args.commit and args.trained_on and args.minutes):
            p.error("RUN, --commit, --trained-on and --minutes are needed (or --card-only)")
        config = RunDir(args.run).read_config() or {}
        write_shipped(args.run, out)
        manifest = check_shipped(out)
        splits = sorted(int(f.split("/")[0][5:]) for f in manifest["files"] if f.endswith(".pt"))
        commands = [f"{train_command(config)}   # writes runs/{Path(args.run).name}, in {args.minutes:.1f} min here",
                    f"python scripts/ship_ensemble.py runs/{Path(args.run).name} --commit {args.commit} "
                    f"--trained-on {shlex.quote(args.trained_on)} --minutes {args.minutes:g}"]
        card = {"name": args.name, "about": {
            "recipe": recipe(config), "commit": args.commit, "machine": args.trained_on, "commands": commands,
            "reproduced": compare_runs(out, Path(args.again), splits) if args.again else
            "Not trained a second time yet: run the commands again and compare with `--again`."}}
    card["figures"] = card_figures(out)
    card["choice"] = candidate_choice(SEARCH_CSV)
    card["files"] = dict(check_shipped(out)["files"])
    bad = unhealthy(card["figures"])
    if bad and not args.card_only:
        shutil.rmtree(out)
        print(f"error: {args.run}: not shipped, a model collapsed ({'; '.join(bad)})", file=sys.stderr)
        return 2
    (out / "card.json").write_text(json.dumps(card, indent=2) + "\n")
    (out / "README.md").write_text(render_card(card))
    print(f"wrote {out} ({len(card['files'])} files) and its card {out / 'README.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
