"""`tumorseg train` in a process of its own, for the distributed tests (run with torchrun or
plain python): `python ddp_train.py [--no-batchnorm] TRAIN-ARGS...`.

--no-batchnorm replaces the U-Net's BatchNorm layers by identities, so that a run of N
processes (each normalising its own shard) can be compared weight for weight with one
process training on the global batch.
"""

import sys

if __name__ == "__main__":
    args = sys.argv[1:]
    if "--no-batchnorm" in args:
        args.remove("--no-batchnorm")
        import torch.nn as nn

        import tumorseg.model

        class _Identity(nn.Identity):
            def __init__(self, *a, **k):
                super().__init__()

        tumorseg.model.nn = type("nn", (), {**{k: getattr(nn, k) for k in dir(nn) if not k.startswith("_")},
                                            "BatchNorm2d": _Identity})
    from tumorseg.cli import main

    sys.exit(main(["train", *args]))
