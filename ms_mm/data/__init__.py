"""ms_mm/data."""
