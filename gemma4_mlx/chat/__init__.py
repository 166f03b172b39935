"""Multi-turn chat: the `Chat` session (KV cache kept across turns, tool loop) and the terminal UI."""
