"""Options several commands share, declared once."""

from __future__ import annotations

import argparse
import textwrap
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
            text += " (default: %(default)s)"
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
    p.add_argument("--trust", action="append", metavar="PKG.MOD:FN",
                   help="a function that builds your own model (package.module:function): "
                        "model files that name it may call it; repeat for several. "
                        "netshrink never imports code a file names without it")
