"""Sampling: schedule, token packing and ids, Euler sampler with the FLUX.2 guidance policies."""
