"""Runtimes, the measurement loop and its statistics, latency tables and prediction."""
