"""The export node: serves backends over the DST node protocol."""
