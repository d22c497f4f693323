"""ms_mm/parallel."""
