"""Loading causal LMs (local path or hub id), the offline base model, and which parameters train."""
