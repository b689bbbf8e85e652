"""Speculative decoding: drafters (EAGLE-3 draft head, n-gram), draft trees, the HeteroSpec policy,
verification.

Layer: above the engine core, below the engine loop. Its device steps (verify, draft, fused round)
are ``DeviceProgram`` objects it hands the model runner, which compiles them from its compile plan
and runs them without importing spec/; request pages and progress go through the scheduler."""
