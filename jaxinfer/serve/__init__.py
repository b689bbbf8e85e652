"""The network front of the engine: gRPC (jaxinfer.v1, JetStream's Orchestrator, health, reflection)
and OpenAI-compatible HTTP, started by ``python -m jaxinfer.serve``."""
