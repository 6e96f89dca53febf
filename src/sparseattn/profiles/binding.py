"""Which profile a method runs with: the file or shipped profile its ``profile`` knob names.

``open_profile`` loads it when the method is built and checks it against the method's knobs;
at bind time ``bind_profile`` resolves 'auto' to the shipped profile matching the hooked model
(``shipped_for``), or checks that a loaded profile was made for that model.
"""

from __future__ import annotations

from typing import Any

from ..errors import UsageError
from .architecture import describe_architecture, fingerprint
from .profile import Profile, load_profile, shipped_profiles


def shipped_for(config: Any, kind: str) -> Profile:
    """The shipped profile of ``kind`` whose fingerprint matches ``config``.

    Raises:
        UsageError: none matches; the message says how to make one.
    """
    have = fingerprint(config)
    for name, path in shipped_profiles().items():
        if not name.endswith("-" + kind):
            continue
        profile = load_profile(str(path), kind)
        if profile.fingerprint == have:
            return profile
    raise UsageError(
        f"no shipped {kind} profile matches {describe_architecture(have)}; make one with "
        f"`sparseattn profile --model MODEL --kind {kind} --out FILE.json` and pass profile=FILE"
    )


def open_profile(name: str, kind: str, **settings: Any) -> Profile | None:
    """The profile a method's ``profile`` knob names, loaded and checked against its knobs.

    '' (none) and 'auto' (the hooked model's shipped profile, found at bind time) give None.
    """
    if name in ("", "auto"):
        return None
    profile = load_profile(name, kind)
    profile.check_settings(**settings)
    return profile


def bind_profile(
    profile: Profile | None, name: str, kind: str, config: Any, **settings: Any
) -> Profile | None:
    """At bind time: resolve 'auto' for ``config``, or check a loaded profile matches it."""
    if name == "auto":
        profile = shipped_for(config, kind)
        profile.check_settings(**settings)
    elif profile is not None:
        profile.check_model(config)
    return profile
