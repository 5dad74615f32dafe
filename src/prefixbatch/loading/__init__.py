"""Loading: find a checkpoint, build the model, tokenizer, KV cache and attention backend once."""
