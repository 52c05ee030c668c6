"""The ``fastsoftmax`` command line: ``train``, ``precision``, ``bench``, ``demo``."""

import argparse
import json
import sys
from pathlib import Path

from ._extras import MissingExtra


def _demo(args) -> int:
    import torch

    import fastsoftmax

    from . import naive

    torch.manual_seed(0)
    logits = torch.randn(4, 10) * 3
    logits[0, 3] = 100.0  # exp(100) overflows float32
    logits[1] -= 200.0  # every exp underflows to 0
    target = torch.tensor([3, 1, 4, 1])
    ref = torch.nn.functional.cross_entropy(logits.double(), target, reduction="none")
    ours = fastsoftmax.cross_entropy(logits, target, reduction="none")
    book = naive.cross_entropy(naive.softmax(logits), target)
    print("per-example cross-entropy on logits holding 100 (row 0) and all below -190 (row 1)")
    print(f"{'row':>4} {'float64 reference':>20} {'fastsoftmax':>14} {'textbook (naive)':>18}")
    for i in range(4):
        print(f"{i:>4} {ref[i].item():>20.6f} {ours[i].item():>14.6f} {book[i].item():>18}")
    return 0


def _train(args) -> int:
    from .d2l import data, model

    try:
        dataset = data.load(args.dataset, args.data_dir)
    except data.DataError as error:
        print(f"fastsoftmax train: {error}", file=sys.stderr)
        return 2
    config = model.TrainConfig(
        dataset=args.dataset,
        epochs=args.epochs,
        lr=args.lr,
        batch_size=args.batch_size,
        loss=args.loss,
        device=args.device,
        seed=args.seed,
    )
    print(
        f"softmax regression on {dataset.name}: {len(dataset.train_labels)} train / {len(dataset.test_labels)} test "
        f"images of {dataset.n_inputs} inputs, loss={args.loss}, lr={args.lr}, batch={args.batch_size}"
    )
    trained, metrics = model.train(dataset, config)
    out = Path(args.out)
    model.write_outputs(trained, dataset, metrics, out)
    print(f"wrote {out / 'metrics.json'}, {out / 'curves.png'}, {out / 'mistakes.png'}")
    return 0


def _precision(args) -> int:
    from . import precision

    result = precision.report()
    print(json.dumps(result, indent=2) if args.json else precision.format_table(result))
    return 0


def _bench(args) -> int:
    from . import bench

    return bench.main(args)


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.ArgumentDefaultsHelpFormatter
    parser = argparse.ArgumentParser(prog="fastsoftmax", description=__doc__, formatter_class=fmt)
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser(
        "train", help="train the book's softmax regression (naive, torch, fused or fused-linear loss)", formatter_class=fmt
    )
    train.add_argument(
        "--dataset",
        choices=["fashion-mnist", "digits"],
        default="fashion-mnist",
        help="fashion-mnist is downloaded (or read from --data-dir); digits ships with scikit-learn",
    )
    train.add_argument("--data-dir", default=None, help="a folder holding the four Fashion-MNIST IDX files")
    train.add_argument("--epochs", type=int, default=10, help="passes over the training set")
    train.add_argument("--lr", type=float, default=0.1, help="SGD learning rate")
    train.add_argument("--batch-size", type=int, default=256, help="examples per SGD step")
    train.add_argument(
        "--loss",
        choices=["fused", "torch", "naive", "fused-linear"],
        default="fused",
        help="fused: fastsoftmax.cross_entropy; torch: torch.nn.functional.cross_entropy; naive: the book's; "
        "fused-linear: fastsoftmax.linear_cross_entropy (the model's product, the loss and its gradients in one call)",
    )
    train.add_argument("--device", default="cpu", help="torch device to train on (cpu, cuda, cuda:1, ...)")
    train.add_argument("--seed", type=int, default=0, help="seed of the initialisation and the batch order")
    train.add_argument("--out", default="out", help="folder for metrics.json, curves.png, mistakes.png")
    train.set_defaults(run=_train)

    prec = sub.add_parser(
        "precision", help="the book's overflow exercises: naive vs ours per dtype, exp limits", formatter_class=fmt
    )
    prec.add_argument("--json", action="store_true", help="print JSON instead of a table")
    prec.set_defaults(run=_precision)

    bench = sub.add_parser(
        "bench", help="naive vs torch vs torch.compile vs fastsoftmax: time, GB/s, memory", formatter_class=fmt
    )
    bench.add_argument("--quick", action="store_true", help="two small shapes, five repeats (under a minute)")
    bench.add_argument("--device", default="cpu", help="torch device to benchmark on")
    bench.add_argument("--repeats", type=int, default=None, help="timed repetitions per case (default: 5 quick, 7 full)")
    bench.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    bench.add_argument("--out", default="bench-out", help="folder for results.json, bandwidth.png, speedup.png")
    bench.set_defaults(run=_bench)

    demo = sub.add_parser("demo", help="the textbook loss overflowing next to ours", formatter_class=fmt)
    demo.set_defaults(run=_demo)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except MissingExtra as error:
        print(error, file=sys.stderr)
        return 2
    except ModuleNotFoundError as error:
        if error.name != "torch":
            raise
        print("fastsoftmax: this command needs PyTorch, which is not installed: pip install torch", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
