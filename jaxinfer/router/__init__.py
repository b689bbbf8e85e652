"""CascadeInfer routing across replica groups (pure Python, no jax): what a router sees
(``base``), the profiled step-time model (``cost_model``), the DP stage partition (``partition``),
the cascade router and the baseline routers, and a discrete-event simulator that drives the same
router objects (``sim``)."""
