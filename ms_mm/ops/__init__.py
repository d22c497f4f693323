"""ms_mm/ops."""
