"""pg-advisory-lock-exporter: PostgreSQL advisory locks, per named key, for Prometheus."""

__version__ = "0.2.0"
