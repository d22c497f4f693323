"""ms_mm/training."""
