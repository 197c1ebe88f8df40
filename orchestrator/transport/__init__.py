"""Transports: the instance contract, the logic every transport shares, SSH, and target names."""
