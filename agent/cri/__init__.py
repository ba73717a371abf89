"""Container and pod attribution from the container runtime, on the node.

- ``cgroups``: the host's cgroup hierarchies and how container runtimes name their cgroups
  (cgroupfs and systemd drivers, cgroup v1 and v2): a task's cgroup path -> pod UID, container ID;
- ``client``: the runtime's CRI socket (``runtime.v1.RuntimeService``, containerd or CRI-O);
- ``pods``: ``PodMetadata``, the node's pods and containers kept fresh from both, which answers
  "whose cgroup is this" for the eBPF collectors' labels and ``namespace_filter``;
- ``endpoints``: the Hubble endpoint gauges from those pods (node scope).

Importing this package loads no gRPC: ``client`` and ``pods`` do, when metadata is wanted.
"""
