"""osocks: a small, fast SOCKS5 server."""

__version__ = "0.1.0"
