"""The network front of the engine: gRPC (jaxinfer.v1, JetStream's Orchestrator, health, reflection)
and OpenAI-compatible HTTP, started by ``python -m jaxinfer.serve``.

Layer: the top. The servicers talk to the engine only through the engine-client protocol
(jaxinfer.engine.client.EngineClient), which ``AsyncEngine`` and the replica groups' ``Cluster``
both implement; the settings come from the config tree (``config``)."""
