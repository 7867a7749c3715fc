"""Estimate: model specs, GPU table, memory and time from physics, dataset tokens."""
