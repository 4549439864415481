"""The baselines on one VTAB-1k task (VPT's driver, `tune_vtab.py` in the original): MODEL.TRANSFER_TYPE
linear, end2end, partial-1, tinytl-bias, prompt, adapter, adaptformer, lora or vqt+{prompt,adaptformer,lora},
searched over the original's grid for `--train-type` (default: the type's, see README "Baselines"), then 5
seeds on train800val200 with test at the last epoch: the same protocol and folders as train.py.

    python tune_vtab.py --config-file configs/vpt/vtab.yaml --optimizer adam MODEL.TRANSFER_TYPE prompt ...
"""
from __future__ import annotations

import sys

from train import main

if __name__ == "__main__":
    sys.exit(main(doc=__doc__))
