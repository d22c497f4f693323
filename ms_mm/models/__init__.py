"""ms_mm/models."""
