"""Per-family adapters from the HF/torch world to ms_mm: config translation and conversion specs.

Each `adapters/<family>.py` exposes `SPEC` (an `convert.spec.FamilySpec`) and `config_from_hf`.
"""
