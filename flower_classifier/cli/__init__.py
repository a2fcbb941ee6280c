"""Command line: `python -m flower_classifier COMMAND` (train, predict, search, evaluate, report,
download, check-data, backbones, export, serve) and the classic `train.py` / `predict.py`, all thin
layers over the library. Mistakes a user can make end in one line on stderr and exit status 2, never
a traceback.

A package with one module per group of commands (`train`: train and search; `predict`: the commands
that use a trained model; `data`: those around a photo folder), `options` for what they share, and
here the one parse-and-run wrapper. Building any parser imports no torch: each command imports what
it needs when it runs.
"""
from __future__ import annotations

import os
import sys
from typing import Callable, NamedTuple

from ..errors import Interrupted, UserError
from . import data, predict, train
from .options import EXIT_INTERRUPTED, EXIT_USER_ERROR, Parser


class Command(NamedTuple):
    add_arguments: Callable
    run: Callable
    help: str
    prepare: Callable | None = None  # (parser, argv) before parsing: `train` reads `search`'s defaults


COMMANDS = {
    "train": Command(train.add_train_arguments, train.run_train, "train a head on a photo folder",
                     train.apply_saved_defaults),
    "predict": Command(predict.add_predict_arguments, predict.run_predict, "name the flower in a photo"),
    "search": Command(train.add_search_arguments, train.run_search, "search head hyperparameters on cached features"),
    "evaluate": Command(predict.add_evaluate_arguments, predict.run_evaluate,
                        "top-1/top-5 accuracy of a checkpoint on a split"),
    "report": Command(predict.add_report_arguments, predict.run_report,
                      "per-class accuracy, confusion matrix, confused pairs and worst mistakes on a split"),
    "download": Command(data.add_download_arguments, data.run_download, "get Oxford 102 in the train/valid/test layout"),
    "check-data": Command(data.add_check_data_arguments, data.run_check_data,
                          "find unreadable, missing, duplicate or unbalanced photos before training"),
    "backbones": Command(lambda p: None, data.run_backbones, "list the available backbones"),
    "export": Command(predict.add_export_arguments, predict.run_export,
                      "checkpoint -> one ONNX file for apps (runs without torch)"),
    "serve": Command(predict.add_serve_arguments, predict.run_serve,
                     "web page and JSON API that name the flower in a photo"),
}


def build_parser(prog: str = "flower_classifier") -> tuple[Parser, dict[str, Parser]]:
    """The top-level parser and its subcommand parsers by name."""
    parser = Parser(prog=prog, description="Flower species classifier by transfer learning.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    subparsers = {}
    for name, command in COMMANDS.items():
        subparsers[name] = sub.add_parser(name, help=command.help, description=command.help)
        command.add_arguments(subparsers[name])
    return parser, subparsers


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser, subparsers = build_parser()
    command = argv[0] if argv and argv[0] in COMMANDS else None
    return parse_and_run(parser, argv, command and subparsers[command], command and COMMANDS[command])


def single_command_main(command: str, prog: str, argv: list[str] | None = None) -> int:
    """`train.py` / `predict.py`: one subcommand as its own program."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = Parser(prog=prog, description=COMMANDS[command].help)
    COMMANDS[command].add_arguments(parser)
    return parse_and_run(parser, argv, parser, COMMANDS[command])


def parse_and_run(parser: Parser, argv: list[str], command_parser: Parser | None, command: Command | None) -> int:
    """Parse `argv` (the options of `command_parser`, the command's own, spelled either way), run the
    command, and turn what a user can get wrong into one line and an exit status."""
    offset = int(command_parser is not parser and command_parser is not None)  # argv[0] names the command
    if command_parser is not None:
        argv = argv[:offset] + command_parser.respell(argv[offset:])
    try:
        if command and command.prepare:
            command.prepare(command_parser, argv[offset:])
        args, extras = parser.parse_known_args(argv)
        if extras:
            (command_parser or parser).refuse_unknown(extras)
        code = command.run(args)  # known: without one, parsing has already exited
        sys.stdout.flush()  # here, so that a closed pipe is met inside this try
        return code
    except BrokenPipeError:  # the reader stopped early (`| head`): nothing went wrong here
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so exit's flush has somewhere to go
        return 1
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except ModuleNotFoundError as e:  # run outside the project's environment (a system python, say)
        if not e.name or e.name.split(".")[0] == __package__.split(".")[0]:
            raise  # our own module missing is a bug, not a set-up step
        how = parser.prog if parser.prog.endswith(".py") else "-m flower_classifier"
        print(f"error: this Python ({sys.executable}) lacks {e.name.split('.')[0]}: set up with `./setup.sh`, then "
              f"run `.venv/bin/python {how} ...`", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt as e:
        if not isinstance(e, Interrupted):  # else what was saved has been said already
            print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
