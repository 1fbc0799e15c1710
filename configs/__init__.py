"""ml_collections configs. Model architectures live in code (`EvfConfig` presets); configs pick them and
hold run settings. Training configs (mesh, sharding rules, optimizer, mixture) come with the training work."""
