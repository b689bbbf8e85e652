"""Small NNX layers and pure functions shared by the models: norm, rotary, linear, attention, sampler."""
