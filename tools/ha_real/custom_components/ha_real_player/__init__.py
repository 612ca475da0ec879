"""A media player that plays by downloading what Home Assistant serves (tools/ha_real only)."""
