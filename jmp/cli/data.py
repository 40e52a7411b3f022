"""``jmp data``: prepare token corpora from local text files.

Example:
    $ jmp data prepare texts/ notes/*.md --out corpora/notes --tokenizer bpe:4096
    $ jmp data prepare texts/ --out corpora/notes --tokenizer bpe:4096   # again: nothing to do
"""

from __future__ import annotations

import argparse
from typing import Any

from jmp.cli.common import CommandParser, positive_int


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Add this command (and its ``prepare`` subcommand) to the ``jmp`` command's subparsers."""
    data = sub.add_parser("data", help="prepare token corpora from text files")
    actions = data.add_subparsers(
        dest="data_command", metavar="{prepare}", required=True, parser_class=CommandParser
    )
    prepare = actions.add_parser(
        "prepare",
        help="tokenize text files into a corpus",
        description="Tokenize local text files (one document per file) into a corpus folder: "
        "memory-mapped token ids, document offsets and a JSON header. Re-running on the same "
        "inputs and tokenizer does nothing.",
    )
    prepare.add_argument("inputs", nargs="+", help="text files, folders (recursive) or globs")
    prepare.add_argument("--out", required=True, help="the corpus folder")
    prepare.add_argument(
        "--tokenizer",
        default="bytes",
        help="bytes | bpe:<vocab_size> (trained here on the inputs) | a tokenizer.json or a "
        "Hugging Face folder holding one",
    )
    prepare.add_argument(
        "--workers",
        type=positive_int,
        default=None,
        help="threads reading and tokenizing files (default: the CPU count, at most 8)",
    )
    prepare.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a corpus of other inputs or another tokenizer in --out, moving it aside "
        "to <out>.replaced-<time> (never deleted)",
    )
    return data


def cmd_data(args: argparse.Namespace) -> int:
    from jmp.train.data import prepare

    prepare(
        args.inputs,
        args.out,
        tokenizer=args.tokenizer,
        workers=args.workers,
        overwrite=args.overwrite,
        progress=True,
    )
    return 0
