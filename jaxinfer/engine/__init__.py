"""The engine: the scheduler and block manager (host), the batch builder and the model runner (device
steps), and the engine loop around them (``Engine``, its asyncio wrapper ``AsyncEngine`` and the
engine-client protocol the front ends use)."""
