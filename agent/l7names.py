"""Label values of DNS and HTTP metrics, shared by the eBPF collectors and the Hubble aggregator."""

from __future__ import annotations

# DNS rcodes as Cilium labels them (hubble_dns_responses); other codes are exported as their number.
RCODES = {
    0: "No Error",
    1: "Format Error",
    2: "Server Failure",
    3: "Non-Existent Domain",
    4: "Not Implemented",
    5: "Query Refused",
}

# DNS qtypes by name (IANA); any other type is exported as "other", so the label stays bounded.
QTYPES = {
    1: "A",
    2: "NS",
    5: "CNAME",
    6: "SOA",
    12: "PTR",
    13: "HINFO",
    15: "MX",
    16: "TXT",
    28: "AAAA",
    33: "SRV",
    35: "NAPTR",
    43: "DS",
    46: "RRSIG",
    47: "NSEC",
    48: "DNSKEY",
    52: "TLSA",
    64: "SVCB",
    65: "HTTPS",
    99: "SPF",
    251: "IXFR",
    252: "AXFR",
    255: "ANY",
    257: "CAA",
}
OTHER_QTYPE = "other"

# HTTP methods in the kernel's numbering (bpf/http.bpf.h, http_classify): index 1..9.
METHODS = ("", "GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH")


def rcode_name(code: int) -> str:
    """DNS rcode as Cilium labels it; unknown codes as their number."""
    return RCODES.get(code) or str(code)


def qtype_name(qtype: int) -> str:
    return QTYPES.get(qtype, OTHER_QTYPE)
