"""Replica groups: several engines (one per sub-mesh of the host's devices) behind one router, served
as one engine client. ``placement`` splits the devices, ``cluster`` routes requests and runs the
router's loop, ``migration`` moves a running request between two replicas' engines."""
