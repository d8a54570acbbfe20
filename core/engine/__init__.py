"""The engine: hook specifications, the step order, the engine that walks it, contracts, precision, health, the run context, the plugin registry and the multi-process runtime."""
