"""Test harness: under torchrun, train several configs of the tiny default one after another in one launch
(the process group is started once), each into OUT/<name>/. Variants come from a JSON file {name: [overrides]}."""

import json
import os
import sys

import torch.distributed as dist

from fluxtrain import config as C
from fluxtrain.train import train


def main() -> None:
    out, variants_file = sys.argv[1], sys.argv[2]
    base = json.loads(os.environ.get("FLUXTRAIN_TEST_BASE", "[]"))
    variants = json.loads(open(variants_file).read())
    dist.init_process_group("gloo")
    for name, overrides in variants.items():
        cfg = C.load("configs/tiny.toml", base + overrides + ["--train.output_dir", os.path.join(out, name)])
        train(cfg)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
