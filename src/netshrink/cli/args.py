"""Options several commands share, declared once."""

from __future__ import annotations

import argparse
import textwrap
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from netshrink.limits import bounded_json


def data_args(p: argparse.ArgumentParser, *, default: str | None = "fashion_mnist") -> None:
    """``--data`` (a dataset's name or a data factory; ``default`` None: the dataset the
    model file records), ``--data-kwargs`` and ``--data-dir``."""
    p.add_argument("--data", default=default,
                   help="dataset name (netshrink list datasets), or your data factory "
                        "pkg.mod:fn (imported because you name it; it returns your "
                        "train/val/test Datasets or DataLoaders)" + (
                       "" if default else "; default: the dataset the model file records"))
    p.add_argument("--data-kwargs", type=json_object, metavar="JSON",
                   help="the data factory's keyword arguments, a JSON object "
                        "(e.g. '{\"root\": \"data/mine\"}')")
    p.add_argument("--data-dir", type=Path,
                   help="folder holding the dataset's files (default: its usual place)")


def json_object(text: str) -> dict[str, Any]:
    """A JSON object of keyword arguments (at most 64 KiB of them)."""
    try:
        value = bounded_json(text, max_bytes=1 << 16)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not JSON ({str(exc)[:120]})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("give a JSON object of keyword arguments, "
                                         "e.g. '{\"size\": 32}'")
    return value


def config_default(config: type[BaseModel], name: str) -> Any:
    """The default of ``config``'s field ``name``: a command's flag defaults to the
    method's own default, so a command, a recipe and the Python verb agree."""
    return config.model_fields[name].get_default(call_default_factory=True)


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive whole number, got {value}")
    return value


def seconds(text: str) -> float:
    """A time in seconds: finite, 0 or more, at most an hour."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 <= value <= 3600:  # NaN fails too
        raise argparse.ArgumentTypeError(f"give 0 to 3600 seconds, not {text}")
    return value


def input_shape(text: str) -> list[int]:
    try:
        dims = [int(d) for d in text.lower().split("x")]
    except ValueError:
        dims = []
    if len(dims) != 3 or min(dims) <= 0:
        raise argparse.ArgumentTypeError(f"expected CxHxW such as 3x224x224, got {text!r}")
    return dims


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the examples' layout, and shows each option's default where it has one."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if ("%(default)" not in text and action.option_strings and default is not None
                and default is not False and default != argparse.SUPPRESS):
            # a list default reads as it is typed (fp32,fp16), not as Python's ['fp32', ...]
            shown = (",".join(map(str, default)) if isinstance(default, list)
                     else "%(default)s")
            text += f" (default: {shown})"
        return text


def subcommand(sub: argparse._SubParsersAction, name: str, summary: str, *examples: str,
                description: str | None = None) -> argparse.ArgumentParser:
    """A subcommand whose ``--help`` shows defaults and ends with examples."""
    lines = "\n".join(f"  {e}" for e in examples)
    text = textwrap.fill(description or summary[0].upper() + summary[1:] + ".", 88)
    return sub.add_parser(name, help=summary, description=text,
                          formatter_class=HelpFormatter,
                          epilog=f"example{'s' if len(examples) > 1 else ''}:\n{lines}")


FILE_KINDS = ("any model file netshrink writes, told by its content: .safetensors, torch "
               ".pth, .onnx (float or INT8), .nspk, OpenVINO .xml (with its .bin)")


def device_arg(p: argparse.ArgumentParser, *, trains: bool = True) -> None:
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                   help="where the model trains and torch models are measured" if trains
                   else "where torch models run (ONNX Runtime and OpenVINO run on the CPU)")


def no_timing_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-timing", action="store_true",
                   help="measure accuracy, size and counts but not latency/throughput (the "
                        "recipe's measure: {latency: false}); much faster")


def runtime_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--runtime", choices=["onnxruntime", "openvino"],
                   help="run an ONNX file in this runtime (default: the one its run measured "
                        "it in, else onnxruntime)")


def trust_arg(p: argparse.ArgumentParser) -> None:
    # A command with positional arguments (run RECIPE, predict IMAGES, study's verb) would
    # see them swallowed by a space-separated list before them: there, commas or the flag
    # repeated.
    positionals = any(not a.option_strings for a in p._actions)
    list_arg(p, "--trust", metavar="PKG.MOD:FN", spaces=not positionals,
             example="mypkg.models:make_cnn",
             help="functions that build your own model (package.module:function): model "
                  "files that name one may call it; netshrink never imports code a file "
                  "names without it")


# ------------------------------------------------------------------ list options

# How every list option reads its values, said once in each one's help.
LIST_SYNTAX = "comma- or space-separated"


def number(text: str) -> float:
    """One number of a list option (``0.35``)."""
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError("not a number") from None


def whole_number(text: str) -> int:
    """One whole number of a list option (``4``)."""
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError("not a whole number") from None


class ListAction(argparse.Action):
    """A list option's values: each command-line word is one item or several separated by
    commas, so ``--x 0.2,0.4``, ``--x 0.2 0.4`` and ``--x 0.2,0.4 0.6`` give one list; a
    repeated flag adds to it. Each item goes through ``item`` (and must be one of
    ``allowed``), and a bad one is refused naming the option, the item and the value.

    argparse's own ``choices`` would be checked against the unsplit words (``fp32,fp16``),
    so the allowed items are checked here, after splitting."""

    def __init__(self, option_strings: list[str], dest: str, *,
                 item: Callable[[str], Any] = str, allowed: Sequence[str] | None = None,
                 none_words: Sequence[str] = (), example: str = "", **kwargs: Any) -> None:
        super().__init__(option_strings, dest, **kwargs)
        self.item, self.allowed, self.none_words, self.example = (
            item, allowed, tuple(none_words), example)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: str | Sequence[str] | None, option_string: str | None = None) -> None:
        words = [values] if isinstance(values, str) else list(values or [])
        given = " ".join(words)
        items = [part.strip() for word in words for part in word.split(",")]
        items = [part for part in items if part]
        if not items or (len(items) == 1 and items[0].lower() in self.none_words):
            if not self.none_words:
                raise argparse.ArgumentError(self, f"{given!r}: give at least one value, "
                                                   f"e.g. {self.example}")
            parsed: list[Any] = []  # ``--drop-blocks 0``: an empty list, said in a word
        else:
            parsed = [self._one(part, given) for part in items]
        earlier = getattr(namespace, self.dest, None)
        # The first use replaces the default; a repeated flag adds to what came before.
        if earlier is None or earlier is self.default:
            earlier = []
        setattr(namespace, self.dest, [*earlier, *parsed])

    def _one(self, part: str, given: str) -> Any:
        if self.allowed is not None and part not in self.allowed:
            raise argparse.ArgumentError(
                self, f"{part!r} in {given!r} is not one of {', '.join(self.allowed)}")
        try:
            return self.item(part)
        except (argparse.ArgumentTypeError, ValueError) as exc:
            raise argparse.ArgumentError(
                self, f"{part!r} in {given!r}: {exc}; give values separated by commas or "
                      f"spaces, e.g. {self.example}") from None


def list_arg(p: argparse.ArgumentParser | argparse._ArgumentGroup, *flags: str,
             help: str, example: str, item: Callable[[str], Any] = str,
             allowed: Sequence[str] | None = None, none_words: Sequence[str] = (),
             spaces: bool = True, **kwargs: Any) -> argparse.Action:
    """Add a list option: every command's lists are read by ``ListAction``, one syntax
    for all of them, and their help says so.

    Args:
        help: what the list is (the syntax is added).
        example: a valid value, for the help and the errors (``0.2,0.35``).
        item: each item's parser (``number``, ``whole_number``, ``str``).
        allowed: the only items accepted (shown as the metavar).
        none_words: words that alone give an empty list (``0``, ``none``).
        spaces: False for an option of a command that takes positional arguments, which
            a space-separated list would swallow: one word per flag there (commas, or the
            flag repeated).
    """
    if allowed is not None:
        kwargs.setdefault("metavar", "{" + ",".join(allowed) + "}")
    syntax = LIST_SYNTAX if spaces else "comma-separated, or the option repeated"
    return p.add_argument(*flags, action=ListAction, nargs="+" if spaces else None,
                          item=item, allowed=allowed, none_words=none_words,
                          example=example, help=f"{help}; {syntax}, e.g. {example}",
                          **kwargs)
