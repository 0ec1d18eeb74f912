"""The transport: manifests, safetensors shards, chunk frames, and the gRPC plumbing. Never imports torch."""
