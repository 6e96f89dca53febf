"""``sparseattn methods``: every registered method, eviction policy and activation sparsity
method, with its knobs."""

from __future__ import annotations

import argparse
import json


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("methods", help="list every method with its knobs, defaults and paper")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..activation import activation_info, list_activations
    from ..registry import list_methods, list_policies, method_info, policy_info

    infos = [method_info(name) for name in list_methods()]
    infos += [policy_info(name) for name in list_policies()]
    infos += [activation_info(name) for name in list_activations()]
    if args.json:
        print(json.dumps(infos, indent=2, default=str))
        return 0
    for info in infos:
        if info.get("kind") == "eviction":
            queries = "  (scores the prompt's queries)" if info["needs_queries"] else ""
            print(f"{info['name']:<16} eviction policy (--evict){queries}")
        elif info.get("kind") == "activation":
            print(f"{info['name']:<16} activation sparsity, decode (--setting 'activation=...')")
        else:
            flag = "" if info["speedup"] else "  [analysis only, not a speedup]"
            print(f"{info['name']:<16} phases: {', '.join(info['phases'])}{flag}")
        print(f"    {info['summary']}")
        print(f"    paper: {info['paper']}")
        for knob in info["knobs"]:
            if knob.get("choices"):
                allowed = knob["choices"]
            elif knob.get("min") is not None or knob.get("max") is not None:
                allowed = [knob.get("min"), knob.get("max")]
            else:
                allowed = "text"
            flag = {"eviction": "--evict-knob", "activation": "activation knob"}.get(
                info["kind"], "--knob"
            )
            default = f"{knob['name']}={knob['default']}"
            print(f"    {flag} {default}  allowed {allowed}  {knob.get('help', '')}")
    return 0
