"""tfo-agent: eBPF and Cilium Hubble observability for Linux hosts."""

__version__ = "0.1.0"
