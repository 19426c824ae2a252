"""Shared by sites and server: the wire protocol and the network."""
