"""The ``fastsoftmax`` command line: ``demo`` (more subcommands register themselves below)."""

import argparse
import sys


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastsoftmax", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("demo", help="the textbook loss overflowing next to ours").set_defaults(run=_demo)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
