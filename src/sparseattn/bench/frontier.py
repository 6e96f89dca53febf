"""The frontier sweep: every (setting x task x length x sample), one JSON record each, resumable."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..errors import UsageError
from ..compat import cache_kwargs, output_cache
from ..integration.hf import sparse_attention
from ..integration.options import HookOptions
from ..integration.stats import DECODE_WARMUP
from ..setting import Setting
from .prefill import benchmark_input
from .runner import SampleRunner, versions
from .sweep import TaskSpec

RESULTS = "results.jsonl"
CONFIG = "config.json"


@dataclass
class FrontierConfig:
    """Everything that defines a run; a DIR holds the records of exactly one configuration."""

    model: str
    settings: list[Setting]
    tasks: list[TaskSpec]
    lengths: list[int]
    samples: int
    seed: int = 0
    options: HookOptions = field(default_factory=HookOptions)
    dtype: str = "float32"
    reuse_prefill: bool = True  # settings that prefill as dense does start from its prefill

    def to_json(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "settings": [s.to_json() for s in self.settings],
            "tasks": [{"name": t.name, "knobs": t.knobs} for t in self.tasks],
            "lengths": self.lengths,
            "samples": self.samples,
            "seed": self.seed,
            "hook_options": self.options.kwargs(),
            "dtype": self.dtype,
            **({} if self.reuse_prefill else {"reuse_prefill": False}),
        }

    def total(self) -> int:
        return len(self.settings) * len(self.tasks) * len(self.lengths) * self.samples


def prepare_out_dir(out_dir: Path, config: FrontierConfig, resume_anyway: bool) -> None:
    """Create DIR, check it is writable, refuse a different configuration already there.

    The sample count may differ: a rerun with more samples extends every cell (the samples
    already there are kept, not recomputed), one with fewer runs only what is missing of them.
    """
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / ".write_test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        raise UsageError(
            f"cannot write to output directory {out_dir}: {err.strerror or err}"
        ) from err
    path = out_dir / CONFIG
    wanted = config.to_json()
    if path.exists():
        existing = json.loads(path.read_text())
        differing = sorted(
            k
            for k in set(existing) | set(wanted)
            if k != "samples" and existing.get(k) != wanted.get(k)
        )
        if differing and not resume_anyway:
            raise UsageError(
                f"{out_dir} already holds a run with a different configuration (differs in: "
                f"{', '.join(differing)}); use a new --out DIR, or --resume-anyway to add to it"
            )
    path.write_text(json.dumps(wanted, indent=2, default=str))


def read_records(path: Path) -> list[dict[str, Any]]:
    """Records of a results file; a line cut short by an interrupted run is dropped."""
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


def repair_tail(path: Path) -> None:
    """Cut a partial last line (no newline) so the next record starts on its own line."""
    if not path.exists() or path.stat().st_size == 0:
        return
    data = path.read_bytes()
    if not data.endswith(b"\n"):
        path.write_bytes(data[: data.rfind(b"\n") + 1])


WARMUP_LENGTH = 1024


@torch.inference_mode()
def warm_up(model, tokenizer, settings: list[Setting], options: HookOptions) -> None:
    """One short prefill and a few decode steps per setting before any record is timed, as
    ``bench prefill`` and ``bench decode`` warm up, so no record carries a kernel compile."""
    if not settings:
        return
    ids = benchmark_input(tokenizer, WARMUP_LENGTH).to(next(model.parameters()).device)
    for setting in settings:
        with sparse_attention(model, **setting.hook_kwargs(), **options.kwargs()):
            out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
            cache, token = output_cache(out), out.logits[:, -1:].argmax(-1)
            for _ in range(DECODE_WARMUP):
                token = model(input_ids=token, **cache_kwargs(model, cache)).logits[:, -1:]
                token = token.argmax(-1)


def record_key(task: str, length: int, sample: int, setting: str) -> tuple:
    return (task, length, sample, setting)


def check_lengths(config: FrontierConfig, tokenizer) -> None:
    """ValueError before any compute when a length is below what a task needs."""
    for spec in config.tasks:
        minimum = spec.build().min_length(tokenizer)
        short = [n for n in config.lengths if n < minimum]
        if short:
            raise UsageError(
                f"length(s) {short} are below what task {spec.label} needs (minimum {minimum} tokens)"
            )


def run_frontier(
    config: FrontierConfig,
    out_dir: str | Path,
    model,
    tokenizer,
    *,
    resume_anyway: bool = False,
    progress: bool = True,
) -> int:
    """Run every missing record of ``config`` into DIR/results.jsonl; return how many were added.

    Records are appended and flushed one by one, so an interrupted run loses nothing written;
    rerunning the same command skips every (task, length, sample, setting) already present.
    """
    out_dir = Path(out_dir)
    check_lengths(config, tokenizer)
    for setting in config.settings:  # a missing or mismatched profile fails before any compute
        for part in setting.parts[:2]:
            part.bind(model.config)
    prepare_out_dir(out_dir, config, resume_anyway)
    results = out_dir / RESULTS
    repair_tail(results)
    done = {
        record_key(r["task"], r["length"], r["sample"], r["setting"]) for r in read_records(results)
    }
    wanted_keys = {
        record_key(spec.label, length, index, setting.label)
        for length in config.lengths
        for spec in config.tasks
        for index in range(config.samples)
        for setting in config.settings
    }
    common = {"model": config.model, "versions": versions(), "seed": config.seed}
    pending = [s for s in config.settings if any(k[3] == s.label for k in wanted_keys - done)]
    warm_up(model, tokenizer, pending, config.options)
    added = 0
    bar = tqdm(
        total=config.total(),
        initial=len(done & wanted_keys),  # records of other configurations do not count
        disable=not progress,
        desc="frontier",
        unit="rec",
    )
    with results.open("a") as sink:
        for length in config.lengths:
            for spec in config.tasks:
                task = spec.build()
                for index in range(config.samples):
                    todo = [
                        s
                        for s in config.settings
                        if record_key(spec.label, length, index, s.label) not in done
                    ]
                    if not todo:
                        continue
                    sample = task.generate(tokenizer, length, config.seed, index)
                    runner = SampleRunner(
                        model, tokenizer, sample, config.options, config.reuse_prefill
                    )
                    for setting in todo:
                        bar.set_postfix_str(
                            f"{spec.label} {length} #{index} {setting.label}", refresh=False
                        )
                        measured = runner.run(setting, task)
                        record = {
                            "task": spec.label,
                            "length": length,
                            "sample": index,
                            "method": setting.family,
                            "setting": setting.label,
                            "knobs": setting.prefill.knobs if setting.is_single else {},
                            "spec": setting.to_json(),
                            "phase_policy": setting.phase_policy(),
                            **measured,
                            "references": list(sample.references),
                            "n_input_tokens": len(sample.input_ids),
                            **common,
                        }
                        sink.write(json.dumps(record, default=str) + "\n")
                        sink.flush()
                        os.fsync(sink.fileno())
                        done.add(record_key(spec.label, length, index, setting.label))
                        added += 1
                        bar.update(1)
    bar.close()
    return added
