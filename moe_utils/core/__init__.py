"""Foundations every layer may use: errors, path constants, progress, memory, hardware, finite checks."""
