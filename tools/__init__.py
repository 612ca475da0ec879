"""Development tools (the method-table generator, the real Home Assistant run); not shipped."""
