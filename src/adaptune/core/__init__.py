"""The adapter core, pure PyTorch: configuration, placement, the bottleneck, adding and routing adapters,
what trains, adapter files. It imports nothing of adaptune outside itself but ``errors`` and ``env``;
backends fill the slots of :mod:`adaptune.core.backend`."""
