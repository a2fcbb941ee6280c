"""Command line: `python -m flower_classifier COMMAND` and the classic `train.py` / `predict.py`,
thin layers over the library. One module per group of commands (`train`: train, search, calibrate;
`predict`: predict; `evaluate`: evaluate, report; `export`: export, serve; `data`: around a photo folder), `options` for what they share, and here
the one parse-and-run wrapper: a user's mistake is one line on stderr and exit status 2. Building
a parser imports no torch: each command imports what it needs when it runs."""
from __future__ import annotations

import difflib
import os
import sys

from ..errors import Interrupted, UserError
from . import data, evaluate, export, predict, train
from .options import EXIT_INTERRUPTED, EXIT_USER_ERROR, Parser, add_shared


# name: (add its arguments, run it, help, what to do with (parser, argv) before parsing or None)
COMMANDS = {
    "train": (train.add_train_arguments, train.run_train, "train a head on a photo folder", train.apply_saved_defaults),
    "predict": (predict.add_predict_arguments, predict.run_predict, "name the flower in a photo", None),
    "search": (train.add_search_arguments, train.run_search, "search head hyperparameters on cached features", None),
    "calibrate": (train.add_calibrate_arguments, train.run_calibrate, "fit a checkpoint's calibrated probabilities and "
                  "its \"not one of my species\" threshold again", None),
    "evaluate": (evaluate.add_evaluate_arguments, evaluate.run_evaluate, "top-1/top-5 accuracy of a checkpoint on a "
                 "split", None),
    "report": (evaluate.add_report_arguments, evaluate.run_report, "per-class accuracy, confusion matrix, confused "
               "pairs and worst mistakes on a split", None),
    "download": (data.add_download_arguments, data.run_download, "get Oxford 102 in the train/valid/test layout", None),
    "check-data": (data.add_check_data_arguments, data.run_check_data, "find unreadable, missing, duplicate or "
                   "unbalanced photos before training", None),
    "backbones": (lambda p: None, data.run_backbones, "list the available backbones", None),
    "export": (export.add_export_arguments, export.run_export, "checkpoint -> one ONNX file for apps (runs without "
               "torch)", None),
    "serve": (export.add_serve_arguments, export.run_serve, "web page and JSON API that name the flower in a "
              "photo", None),
}

# The commands that compute nothing with torch or ONNX Runtime, so take no --threads.
NO_COMPUTE = {"download", "check-data", "backbones"}


def add_arguments(name: str, parser: Parser) -> None:
    """Command `name`'s arguments on `parser`, --threads included wherever it computes."""
    COMMANDS[name][0](parser)
    if name not in NO_COMPUTE and "--threads" not in parser.flags():
        add_shared(parser, "--threads")


def build_parser(prog: str = "flower_classifier") -> tuple[Parser, dict[str, Parser]]:
    """The top-level parser and its subcommand parsers by name."""
    parser = Parser(prog=prog, description="Flower species classifier by transfer learning.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    subparsers = {}
    for name, (_, _, help_text, _) in COMMANDS.items():
        subparsers[name] = sub.add_parser(name, help=help_text, description=help_text)
        add_arguments(name, subparsers[name])
    return parser, subparsers


def command_list() -> str:
    """What `python -m flower_classifier` alone prints: the commands, one line each."""
    width = max(map(len, COMMANDS))
    return "\n".join(["usage: python -m flower_classifier COMMAND ...  (COMMAND --help: its options)", "",
                      "Commands:", *(f"  {name:<{width}}  {help_text}" for name, (_, _, help_text, _) in COMMANDS.items()),
                      "", "train.py and predict.py are `train` and `predict` as scripts of their own."])


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:  # asking what there is: the list, and exit 0
        print(command_list())
        return 0
    parser, subparsers = build_parser()
    name = argv[0] if argv and argv[0] in COMMANDS else None
    mistyped = argv and not name and not argv[0].startswith("-")
    near = difflib.get_close_matches(argv[0], COMMANDS, n=1) if mistyped else []
    if near:
        parser.error(f"unknown command {argv[0]!r}; did you mean {near[0]}?")
    return parse_and_run(parser, argv, name, subparsers.get(name), skip=1)


def single_command_main(command: str, prog: str, argv: list[str] | None = None) -> int:
    """`train.py` / `predict.py`: one subcommand as its own program."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = Parser(prog=prog, description=COMMANDS[command][2])
    add_arguments(command, parser)
    return parse_and_run(parser, argv, command, parser, skip=0)


def _run_with_threads(run, args) -> int:
    """The command, with --threads applied to all it computes (and torch's own setting back after)."""
    if getattr(args, "threads", None) is None:
        return run(args)
    from ..devices import threads

    with threads(args.threads, chosen=True):
        return run(args)


def parse_and_run(parser: Parser, argv: list[str], name: str | None, own: Parser | None, skip: int) -> int:
    """Parse `argv`, whose first `skip` name the command `name` and the rest are the options of its
    parser `own` (spelled with hyphens or not), run the command, and turn what a user can get wrong
    into one line and an exit status."""
    _, run, _, prepare = COMMANDS.get(name, (None,) * 4)
    argv = argv[:skip] + (own.respell(argv[skip:]) if own else argv[skip:])
    try:
        if prepare:
            prepare(own, argv[skip:])
        args, extras = parser.parse_known_args(argv)
        if extras and own is not None:
            extras = own.regroup(args, extras)
        if extras:
            (own or parser).refuse_unknown(extras)
        code = _run_with_threads(run, args)  # known: without a command, parsing has already exited
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
