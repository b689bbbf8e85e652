"""Native CPU kernels called from jitted JAX code through XLA's FFI: C++ sources in this folder,
compiled once per machine by ``build.py`` (quantized matmul: ``qmatmul.cc``, used by
``jaxinfer.layers.quant``; paged attention: ``attention.cc``)."""
