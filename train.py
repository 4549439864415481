"""VQT on one VTAB-1k task: lr x wd search on val200, then 5 seeds on train800val200 (test at the
last epoch); with --sparse-mode, one classifier-compression stage instead.

    python train.py --config-file configs/h2t-prompt/vtab.yaml --optimizer adam KEY VALUE ...

Options come first; everything from the first KEY on is a list of KEY VALUE config overrides.
"""
from __future__ import annotations

import argparse
import sys

from src.configs.defaults import load_cfg
from src.configs.transfer import GRID_NAMES
from src.configs.validate import SPARSE_MODES
from src.errors import VQTError, run_cli
from src.utils.cli import HelpFormatter
from src.utils.quiet import quiet_tensorflow


def parse_args(argv: list[str] | None = None, doc: str = __doc__) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=doc, formatter_class=HelpFormatter, allow_abbrev=False)
    p.add_argument("--config-file", default="", help="yaml config (e.g. configs/h2t-prompt/vtab.yaml)")
    p.add_argument("--train-type", default=None, help="sets SOLVER.SEARCH_GRID, the lr x wd grid searched: one of "
                   f"{', '.join(GRID_NAMES)} (h2t-prompt is VQT's, the others tune_vtab.py's); default: "
                   "MODEL.TRANSFER_TYPE's")
    p.add_argument("--optimizer", default=None, help="sets SOLVER.OPTIMIZER (adam or sgd; default: the config's)")
    p.add_argument("--dont_search", "--dont-search", action="store_true", help="skip the lr x wd search")
    p.add_argument("--arch_feats", "--arch-feats", default="",
                   help="sup_vitl16_imagenet21k / sup_vith14_imagenet21k select the smaller Adam grid")
    p.add_argument("--lr", type=float, default=None, help="train the final runs at this lr (no search); "
                   "same as SOLVER.BASE_LR, needs --wd")
    p.add_argument("--wd", type=float, default=None, help="weight decay for --lr; same as SOLVER.WEIGHT_DECAY")
    p.add_argument("--overwrite", action="store_true",
                   help="retrain finished runs whose settings changed (default: stop and name the changed settings)")
    p.add_argument("--sparse-mode", "--h2t_sparse_mode", dest="sparse_mode", default=None,
                   choices=SPARSE_MODES, help="run one classifier-compression stage")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    return p.parse_args(argv)


def main(argv: list[str] | None = None, doc: str = __doc__) -> int:
    """Parse the command line (`doc` is its help text) and run the protocol; the exit status."""
    quiet_tensorflow()
    args = parse_args(argv, doc)
    return run_cli(lambda: _run(args))


def _run(args: argparse.Namespace) -> None:
    flag = next((o for o in args.opts if o.startswith("--")), None)
    if flag:
        raise VQTError(f"option {flag.split('=')[0]} must come before the KEY VALUE overrides")
    opts = list(args.opts)
    for flag, key, value in (("--optimizer", "SOLVER.OPTIMIZER", args.optimizer),
                             ("--train-type", "SOLVER.SEARCH_GRID", args.train_type)):
        if value is None:
            continue
        given = dict(zip(opts[0::2], opts[1::2])).get(key, value)
        if given != value:
            raise VQTError(f"{flag} {value} but the overrides set {key} {given}: drop one of them")
        opts = [key, value, *opts]
    opts += [x for key, v in (("SOLVER.BASE_LR", args.lr), ("SOLVER.WEIGHT_DECAY", args.wd)) if v is not None
             for x in (key, repr(v))]
    cfg = load_cfg(args.config_file, opts)
    cfg.freeze()
    from src.engine.protocol import run_protocol  # imports torch/TF: after the arguments are checked
    run_protocol(cfg, dont_search=args.dont_search, sparse_mode=args.sparse_mode, arch_feats=args.arch_feats,
                 overwrite=args.overwrite)


if __name__ == "__main__":
    sys.exit(main())
