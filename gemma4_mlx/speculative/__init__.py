"""Speculative decoding with Gemma 4's MTP drafters: the round, the loop, the draft-length policy."""
