"""The aggregator service. Never imports torch: it moves and sums safetensors bytes with numpy."""
