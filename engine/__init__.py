"""Shared machinery behind the scripts: errors, metrics, evaluation, visualisation, CLI helpers."""
