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
- ``duo`` (DuoAttention gates): ``heads[0][layer][kv_head]`` is the head's trained gate in
  [0, 1] (retrieval head at >= 0.5); ``summary[0]`` has each layer's ``mean_gate`` and
  ``retrieval_heads``.

``summary[level]`` holds the calibration's mean recall and density per layer at that level
(channels: ``summary[r]["share"]``, the share of channel importance the first r channels hold).

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
]
