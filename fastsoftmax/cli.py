"""The ``fastsoftmax`` command line: ``train``, ``precision``, ``bench``, ``demo``."""

import argparse
import json
import sys
from pathlib import Path


def _demo(args) -> int:
    import torch

    import fastsoftmax
    from fastsoftmax import naive

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
    from . import data, model

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
    parser = argparse.ArgumentParser(prog="fastsoftmax", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train the book's softmax regression (naive, torch or fused loss)")
    train.add_argument("--dataset", choices=["fashion-mnist", "digits"], default="fashion-mnist")
    train.add_argument("--data-dir", default=None, help="a folder holding the four Fashion-MNIST IDX files")
    train.add_argument("--epochs", type=int, default=10)
    train.add_argument("--lr", type=float, default=0.1)
    train.add_argument("--batch-size", type=int, default=256)
    train.add_argument("--loss", choices=["fused", "torch", "naive"], default="fused")
    train.add_argument("--device", default="cpu")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--out", default="out", help="folder for metrics.json, curves.png, mistakes.png")
    train.set_defaults(run=_train)

    prec = sub.add_parser("precision", help="the book's overflow exercises: naive vs ours per dtype, exp limits")
    prec.add_argument("--json", action="store_true", help="print JSON instead of a table")
    prec.set_defaults(run=_precision)

    bench = sub.add_parser("bench", help="naive vs torch vs torch.compile vs fastsoftmax: time, GB/s, memory")
    bench.add_argument("--quick", action="store_true", help="two small shapes, five repeats (under a minute)")
    bench.add_argument("--device", default="cpu")
    bench.add_argument("--repeats", type=int, default=None)
    bench.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    bench.add_argument("--out", default="bench-out", help="folder for results.json, bandwidth.png, speedup.png")
    bench.set_defaults(run=_bench)

    sub.add_parser("demo", help="the textbook loss overflowing next to ours").set_defaults(run=_demo)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
