"""The owned forward path: the service's own model code and KV cache for the architectures that matter most."""
