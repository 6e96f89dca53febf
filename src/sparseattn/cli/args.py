"""Argument helpers every command shares: lengths, knobs, --min-length, the setting flags and
the model flags, and a profile's --out.

Bad input raises ``UsageError`` (one line, exit status 2); argparse's own type errors (a bad
``--min-length``) stay argparse's.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..errors import UsageError
from ..models import DEFAULT_MODEL, builtin_models
from ..parsing import parse_value
from ..setting import Setting, Spec

DTYPES = ["float32", "bfloat16", "float16"]


def parse_lengths(text: str) -> list[int]:
    """'4k,8k,1000' -> [4096, 8192, 1000]."""
    lengths = []
    for part in text.split(","):
        part = part.strip().lower()
        if not part:
            continue
        try:
            lengths.append(int(float(part[:-1]) * 1024) if part.endswith("k") else int(part))
        except ValueError:
            raise UsageError(f"bad length {part!r}; use integers or NNk, e.g. 4k,8k") from None
    return lengths


def parse_knobs(pairs: list[str] | None) -> dict[str, Any]:
    """['window=512', 'profile=none'] -> {'window': 512, 'profile': None}."""
    knobs = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise UsageError(f"--knob expects name=value, got {pair!r}")
        name, value = pair.split("=", 1)
        knobs[name.strip()] = parse_value(value.strip())
    return knobs


def min_length_arg(text: str) -> int | str:
    """--min-length: an integer >= 0 or 'auto'."""
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give an integer >= 0 or 'auto'") from None


def add_model_arg(p: argparse.ArgumentParser) -> None:
    """--model: a built-in name, a folder, a .gguf file or a cached Hugging Face id."""
    p.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help=f"built-in name ({', '.join(builtin_models())}), local folder, .gguf file or "
        "cached HF id",
    )


def add_dtype_device_args(p: argparse.ArgumentParser) -> None:
    """--dtype and --device the model is loaded with."""
    p.add_argument("--dtype", default="float32", choices=DTYPES)
    p.add_argument("--device", default="cpu")


def add_setting_args(p: argparse.ArgumentParser, method_default: str, method_help: str) -> None:
    """--method/--knob (one method, or the prefill method with --decode), --decode, --evict,
    or a whole --setting."""
    p.add_argument("--method", default=method_default, help=method_help)
    p.add_argument("--knob", action="append", metavar="NAME=VALUE", help="method knob, repeatable")
    p.add_argument("--decode", help="decode method (then --method is the prefill method)")
    p.add_argument("--decode-knob", action="append", metavar="NAME=VALUE", help="repeatable")
    p.add_argument("--evict", help="eviction policy (see `sparseattn methods`)")
    p.add_argument("--evict-knob", action="append", metavar="NAME=VALUE", help="repeatable")
    p.add_argument(
        "--setting",
        action="append",
        help="a whole setting, e.g. 'prefill=xattention;decode=streaming[window=512];"
        "evict=streaming[window=1024]' (instead of the flags above; bench decode takes it "
        "repeatedly and measures every setting against one dense prefill and reference)",
    )
    p.add_argument("--page-size", type=int, default=16, help="cache page size in tokens")


def settings_from_args(args: argparse.Namespace) -> list[Setting]:
    """Every --setting given (validated), or the one the --method/--decode/--evict flags
    describe."""
    if args.setting:
        settings = [Setting.parse(text) for text in args.setting]
        for setting in settings:
            _ = setting.parts, setting.activation_part  # bad names and knobs fail here
        return settings
    return [setting_from_args(args)]


def setting_from_args(args: argparse.Namespace) -> Setting:
    """The Setting the --method/--decode/--evict/--setting flags describe (validated)."""
    if args.setting and len(args.setting) > 1:
        raise UsageError(
            f"--setting given {len(args.setting)} times; only bench decode measures several "
            "settings in one run"
        )
    if args.setting:
        setting = Setting.parse(args.setting[0])
    else:
        method = Spec(args.method, parse_knobs(args.knob))
        evict = Spec(args.evict, parse_knobs(args.evict_knob)) if args.evict else None
        if args.decode:
            decode = Spec(args.decode, parse_knobs(args.decode_knob))
            setting = Setting(prefill=method, decode=decode, evict=evict)
        else:
            setting = Setting(prefill=method, decode=method, evict=evict)
    _ = setting.parts  # builds every method and policy: bad names and knobs fail here
    return setting


def json_out_path(text: str) -> Path:
    """--out FILE.json in an existing folder (checked before any model loads)."""
    out = Path(text)
    if out.suffix != ".json":
        raise UsageError(f"--out {text!r} must name a .json file")
    if not out.parent.is_dir():
        raise UsageError(f"--out {text!r}: folder {str(out.parent)!r} does not exist")
    return out
