"""Speculative decoding: drafters (EAGLE-3 draft head, n-gram), draft trees, verification."""
