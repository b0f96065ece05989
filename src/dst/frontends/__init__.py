"""Front ends: the ways a client node exposes its assembled device (NBD, FUSE)."""
