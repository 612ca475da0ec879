"""The method-table generator: development only, not in the wheel."""
