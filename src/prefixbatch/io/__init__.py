"""I/O: OpenAI batch files in and out, progress."""
