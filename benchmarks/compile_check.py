"""Does torch.compile pay for tumorseg's U-Net? Inference, eager vs compiled, same run.

    python benchmarks/compile_check.py [--json OUT]

The skip connections travel through forward hooks and a per-call stack kept in a
ContextVar; Dynamo cannot trace ContextVar.get/.set, so it breaks the graph there. This
script measures what that leaves of the speed-up and lists the graph breaks.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch._dynamo

from tumorseg.config import preset
from tumorseg.graphs import fuse_batchnorm
from tumorseg.model import UNet
from tumorseg.runtime import autocast, resolve_precision


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", default=None, help="write the results here (default: print only)")
    ap.add_argument("--batch", type=int, default=16, help="slices per forward pass (default: 16)")
    ap.add_argument("--reps", type=int, default=3, help="timed repetitions, median reported (default: 3)")
    args = ap.parse_args()

    torch.manual_seed(0)
    cfg = preset("default")
    device = torch.device("cpu")
    model = fuse_batchnorm(UNet.from_config(cfg.model_config()).eval()).to(memory_format=torch.channels_last)
    dtype = resolve_precision(cfg.precision, device, model, sample=(2, 3, 256, 256), channels_last=True)
    x = torch.rand(args.batch, 3, 256, 256).contiguous(memory_format=torch.channels_last)

    def timed(fn) -> tuple[float, torch.Tensor]:
        times = []
        for _ in range(args.reps):
            t0 = time.perf_counter()
            with torch.inference_mode(), autocast(device, dtype):
                y = fn(x)
            times.append(time.perf_counter() - t0)
        return args.batch / sorted(times)[len(times) // 2], y

    with torch.inference_mode(), autocast(device, dtype):
        model(x)  # warm-up
    eager, y_eager = timed(model)
    torch._dynamo.reset()
    compiled = torch.compile(model)
    t0 = time.perf_counter()
    with torch.inference_mode(), autocast(device, dtype):
        compiled(x)
    compile_s = time.perf_counter() - t0
    fast, y_fast = timed(compiled)
    breaks = {k.split("\n")[0]: v for k, v in torch._dynamo.utils.counters["graph_break"].items()}
    result = {
        "eager_img_s": eager, "compiled_img_s": fast, "ratio": fast / eager, "compile_seconds": compile_s,
        "max_abs_diff": float((y_eager.float() - y_fast.float()).abs().max()), "graph_breaks": breaks,
        "precision": str(dtype).replace("torch.", "") if dtype else "float32", "batch": args.batch,
        "threads": torch.get_num_threads(), "torch": torch.__version__,
    }
    print(f"{'path':<10} {'infer img/s':>12}")
    print(f"{'eager':<10} {eager:>12.1f}")
    print(f"{'compiled':<10} {fast:>12.1f}   ({fast / eager:.2f}x; compiling took {compile_s:.0f} s)")
    for k, v in breaks.items():
        print(f"graph break x{v}: {k}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
