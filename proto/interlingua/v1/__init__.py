"""Generated protobuf and gRPC code for the ``interlingua.v1`` API (do not edit; ``make proto``)."""
