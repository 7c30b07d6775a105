"""The chat: an async prompt-toolkit REPL (interactive) or a line reader (piped input)."""
