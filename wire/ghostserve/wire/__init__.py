"""The wire layer: conversions between protobuf messages and the kernels' value types."""
