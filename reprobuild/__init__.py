"""reprobuild: bit-for-bit reproducible, verifiable Debian disk images."""

__version__ = "0.1.0"
