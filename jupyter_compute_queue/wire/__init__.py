"""What both ends of the worker socket share: the messages of one loop turn in one frame, and
the protocol's JSON (docs/protocol.md)."""
