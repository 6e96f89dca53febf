"""Decode-time selection: methods that choose, per generated token, which cached tokens to read."""
