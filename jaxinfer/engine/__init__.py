"""Engine: KV cache, model runner and (later) scheduler and block manager."""
