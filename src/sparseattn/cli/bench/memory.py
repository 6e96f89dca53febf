"""``sparseattn bench memory``: a long stream token by token (cache bytes, RSS, s/token, NLL),
or peak memory and KV bytes against the prompt length (``--prompt-tokens A,B,...``)."""

from __future__ import annotations

import argparse
import sys

from ..args import add_dtype_device_args, parse_lengths, setting_from_args
from .common import (
    add_record_args,
    add_setting_run_args,
    check_plot,
    emit_records,
    hook_options,
    load,
)


def add_parser(kinds: argparse._SubParsersAction) -> None:
    about = (
        "a long stream token by token: cache bytes, RSS, s/token, NLL; or peak memory vs "
        "prompt length"
    )
    p = kinds.add_parser("memory", help=about, description=about)
    add_setting_run_args(p)
    p.add_argument(
        "--tokens",
        help="tokens streamed after the prompt (default 20k), or generated after each prompt "
        "of a --prompt-tokens sweep (default 8)",
    )
    p.add_argument(
        "--prompt-tokens",
        default="1024",
        help="prompt length; a comma list (e.g. 8k,16k,32k) measures peak memory and KV bytes "
        "vs prompt length instead of a stream (chunked with chunk=N in --setting)",
    )
    p.add_argument("--every", type=int, default=512, help="tokens per record")
    p.add_argument(
        "--dense-reference",
        action="store_true",
        help="also the dense NLL of the same text inside the model's context",
    )
    p.add_argument(
        "--plot",
        metavar="FILE.png",
        help="the records against the tokens seen, or against the prompt length for a sweep",
    )
    add_dtype_device_args(p)
    add_record_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    check_plot(args)
    setting = setting_from_args(args)
    options = hook_options(args)
    model, tok = load(args)
    records = emit_records(_records(args, model, tok, setting, options), args)
    if args.plot:
        from ...bench.plots import memory_curves, prompt_memory_curves

        if records and "prompt_tokens" in records[0]:
            prompt_memory_curves(records, args.plot)
        else:
            memory_curves(records, args.plot)
        print(f"plot: {args.plot}", file=sys.stderr)
    return 0


def _records(args, model, tok, setting, options):
    from ...bench.memory import dense_window_nll, run_memory_bench, run_prompt_memory

    prompts = parse_lengths(args.prompt_tokens)
    if len(prompts) > 1:  # the sweep: peak memory and KV bytes vs prompt length
        yield from run_prompt_memory(
            model,
            tok,
            setting,
            prompts,
            new_tokens=parse_lengths(args.tokens or "8")[0],
            options=options,
            progress=not args.json,
        )
        return
    tokens = parse_lengths(args.tokens or "20k")[0]
    yield from run_memory_bench(
        model,
        tok,
        setting,
        tokens,
        prompt=prompts[0],
        every=args.every,
        options=options,
        progress=not args.json,
    )
    context = min(prompts[0] + tokens, getattr(model.config, "max_position_embeddings", 0))
    if args.dense_reference and context > args.every:
        yield from dense_window_nll(model, tok, context, args.every)
