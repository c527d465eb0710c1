"""Stage the whole CIFAR-10 set and the ResNet-50 weights on a lent GPU machine, one call at a time.

A device call carries at most 64 MiB with the working tree, so the 184 MB data set and the 52 MB
weights go over in four calls, each into the ignored folder cifar/, which stays on the machine
between calls while it is warm (it forgets it about 30 s after the last call ends):

    python benchmarks/stage_data.py --data-dir ../shared/data --weights ../shared/weights/resnet50-msra-v1-imagenet.pth

writes stage/1 .. stage/4 here (ignored; two batch files each, the weights in the fourth) and prints
the four device commands, each with its `carry`. Then, in the same warm session, one model a call
(gpu_check.py --full-data trains as many epochs as fit its budget):

    python3 benchmarks/gpu_check.py --data-dir cifar --weights cifar/resnet50.pth --full-data --model MODEL \
        --budget 220 --out $OUT      (timeout_s 250)

Cost: four calls of one copy each; not measured yet (no GPU has been lent since this was written):
expect the transfer of ~60 MB per call plus the call's own overhead, seconds when warm.
"""
import argparse
import os
import shutil
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GROUPS = [["data_batch_1.bin", "data_batch_2.bin"], ["data_batch_3.bin", "data_batch_4.bin"],
          ["data_batch_5.bin", "test_batch.bin"]]
LIMIT = 64 * 2**20  # bytes per call, the working tree included
# --full-data's models, one a call (gpu_check.ACCURACY_ORDER, then the frozen ones, which need weights)
FULL_DATA_MODELS = ["resnet_att_scratch", "resnet_scratch", "sample_resnet", "resnet_att", "resnet"]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--data-dir", required=True, help="folder holding cifar-10-batches-bin")
    p.add_argument("--weights", help="the ResNet-50 weights file (a fourth call)")
    p.add_argument("--stage", default=os.path.join(ROOT, "stage"),
                   help="where the parts go: a folder of the working tree that git ignores (default stage/)")
    args = p.parse_args(argv)
    src = os.path.join(args.data_dir, "cifar-10-batches-bin")
    if not os.path.isdir(src):
        sys.exit(f"stage_data.py: error: {src} does not exist")
    stage = os.path.relpath(os.path.abspath(args.stage), ROOT)
    if stage.startswith(".."):  # a device call carries paths of the working tree only
        sys.exit(f"stage_data.py: error: --stage {args.stage} is outside the working tree {ROOT}")
    parts = [[os.path.join(src, n) for n in names] for names in GROUPS]
    if args.weights:
        parts.append([args.weights])
    shutil.rmtree(os.path.join(ROOT, stage), ignore_errors=True)
    for k, files in enumerate(parts, start=1):
        dest = os.path.join(stage, str(k))  # relative to ROOT: what `carry` names
        os.makedirs(os.path.join(ROOT, dest))
        for f in files:
            shutil.copy(f, os.path.join(ROOT, dest, "resnet50.pth" if f == args.weights else os.path.basename(f)))
        size = sum(os.path.getsize(f) for f in files)
        target = "cifar/" if f == args.weights else "cifar/cifar-10-batches-bin/"
        note = "" if size < LIMIT - 4 * 2**20 else "  (close to the 64 MiB limit with the working tree!)"
        print(f"call {k}: carry [\"{dest}\"] ({size / 2**20:.1f} MiB){note}\n"
              f"    command: mkdir -p {target} && cp {dest}/* {target} && ls -l {target}")
    models = FULL_DATA_MODELS if args.weights else FULL_DATA_MODELS[:3]
    print(f"then one call per model, MODEL one of {', '.join(models)}:\n"
          "    command: python3 benchmarks/gpu_check.py --data-dir cifar"
          + (" --weights cifar/resnet50.pth" if args.weights else "")
          + " --full-data --model MODEL --budget 220 --out $OUT   (timeout_s 250)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
