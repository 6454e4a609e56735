"""``atlas data list``: the registered datasets."""

from __future__ import annotations

import argparse

from modelatlas.cli.output import echo


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="list offline datasets")
    dsub = p.add_subparsers(dest="data_command", metavar="SUBCOMMAND")
    lst = dsub.add_parser("list", help="list registered datasets")
    lst.set_defaults(func=_list)


def _list(args: argparse.Namespace) -> int:
    """Each dataset, whether it loads on this machine (a new user asked why fashion-mnist failed) and what it is."""
    from modelatlas.data import available_datasets  # imports torch: not at registration (`atlas --help`)
    from modelatlas.data.registry import dataset_status

    for name, desc in sorted(available_datasets().items()):
        echo(f"{name:16s} {desc}\n{'':16s} here: {dataset_status(name)}")
    return 0
