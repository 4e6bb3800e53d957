"""The gateway manager: leader-elected, assigns egress IPs to gateway nodes, owns the status."""
