"""``sparseattn generate``: generate from a prompt with one sparse setting."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..errors import UsageError
from .args import (
    add_dtype_device_args,
    add_model_arg,
    add_setting_args,
    min_length_arg,
    setting_from_args,
)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate from a prompt with a sparse setting")
    add_model_arg(p)
    add_setting_args(p, "dense", "registered method (see `sparseattn methods`)")
    p.add_argument("--prompt-file", help="file holding the prompt")
    p.add_argument("--prompt", help="prompt text (instead of --prompt-file)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument(
        "--min-length",
        type=min_length_arg,
        default="auto",
        help="calls with fewer keys stay dense; 'auto' (default): the crossover measured once on "
        "this machine",
    )
    p.add_argument("--no-chat-template", action="store_true", help="feed the prompt as plain text")
    add_dtype_device_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from .. import load_model, sparse_attention

    prompt = Path(args.prompt_file).read_text() if args.prompt_file else args.prompt
    if prompt is None:
        raise UsageError("give --prompt-file FILE or --prompt TEXT")
    setting = setting_from_args(args)  # bad methods and knobs fail before the model loads
    model, tok = load_model(args.model, dtype=args.dtype, device=args.device)
    if tok.chat_template and not args.no_chat_template:
        ids = tok.apply_chat_template(
            [{"role": "user", "content": prompt}],
            add_generation_prompt=True,
            return_tensors="pt",
            return_dict=True,
        )["input_ids"]
    else:
        ids = tok(prompt, return_tensors="pt").input_ids
    ids = ids.to(args.device)
    with (
        torch.inference_mode(),
        sparse_attention(
            model, **setting.hook_kwargs(), min_length=args.min_length, page_size=args.page_size
        ) as stats,
    ):
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=args.max_new_tokens,
            do_sample=False,
            pad_token_id=tok.pad_token_id,
        )
    print(tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True))
    summary = {
        "setting": setting.label,
        "prompt_tokens": ids.shape[1],
        **{
            p: {k: v for k, v in s.items() if k != "layer_density"} if isinstance(s, dict) else s
            for p, s in stats.summary().items()
        },
    }
    print(json.dumps(summary), file=sys.stderr)
    return 0
