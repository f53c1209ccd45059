"""stackrlhf: RLHF for Stack Exchange question answering, from a raw data dump to an aligned model."""

__version__ = "0.1.0"
