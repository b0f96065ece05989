"""The client node: remote members and the device stack above them."""
