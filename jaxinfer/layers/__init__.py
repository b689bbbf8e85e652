"""Small NNX layers and pure functions shared by the models, and the step vocabulary every layer above
shares: norm, rotary, linear and the quantized matmul, paged attention with one metadata type per
attention mode (``attention``), the KV page pool and its padding slot (``kv_pages``), the sampler.

Layer: above the kernels (pallas_kernels, jaxinfer.cpu) and the configs; below models/, the engine
and spec/ (tests/test_layering.py checks every import points down)."""
