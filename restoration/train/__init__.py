"""Training code: patch sampling and per-step maths (plain PyTorch), plus the Ray Train loops built on them."""
