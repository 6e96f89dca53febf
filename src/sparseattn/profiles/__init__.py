"""Per-head calibration profiles: reading, checking against a model, and the shipped ones.

A profile is a JSON file written by ``sparseattn profile``. It names the model it was made
for (an architecture fingerprint), how it was calibrated (lengths, seed, inputs), and one entry
per (layer, head) and level. The kinds:

- ``minference``: ``choices`` lists candidate patterns with their knobs; for each tile-density
  budget, ``heads[budget][layer][head]`` is the index of the choice that head uses;
- ``xattention``: for each target recall, ``heads[target][layer][head]`` is the threshold that
  head needs;
- ``channels`` (double_sparsity): ``heads[0][layer][kv_head]`` orders the head's channels from
  most to least important, so any number of channels is a prefix of it;
- ``retrieval``: ``heads[0][layer][q_head]`` is the head's retrieval score in [0, 1] (share of
  copied needle tokens its argmax attention points at); summary: max score and the count of
  heads >= 0.1 / 0.3 per layer;
- ``duo``: ``heads[0][layer][kv_head]`` is the head's trained DuoAttention gate in [0, 1]
  (retrieval head at >= 0.5); ``summary[0]`` has each layer's ``mean_gate`` and
  ``retrieval_heads``;
- ``moa``: ``choices`` lists span rules {"alpha", "beta", "sink"} (span(N) = alpha + beta * N,
  ``span_at``); for each kept-KV budget (the mean share of the tokens a head keeps at the
  profiled lengths), ``heads[budget][layer][kv_head]`` is the index of the rule that head uses.

``summary[level]`` holds the calibration's mean recall and density per layer at that level
(channels: ``summary[r]["share"]``, the share of channel importance the first r channels hold,
and ``summary[r]["head_share"]`` the same per KV head; moa: kept share, predicted loss and mean
span per layer). ``sparseattn profile --show FILE`` prints any kind as a map (``show.py``).

Shipped profiles live next to this module as ``<model>-<kind>.json``.
"""

from .architecture import fingerprint
from .binding import bind_profile, open_profile, shipped_for
from .profile import (
    FORMAT,
    KINDS,
    SHIPPED_DIR,
    Profile,
    load_profile,
    resolve,
    save_profile,
    shipped_profiles,
    span_at,
)

__all__ = [
    "FORMAT",
    "KINDS",
    "SHIPPED_DIR",
    "Profile",
    "bind_profile",
    "fingerprint",
    "load_profile",
    "open_profile",
    "resolve",
    "save_profile",
    "shipped_for",
    "shipped_profiles",
    "span_at",
]
