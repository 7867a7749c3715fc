"""Runs: the SQLite run store, reports, and corrections learned from finished runs."""
