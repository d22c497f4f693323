"""ms_mm.models: one package per model family — everything that is that family's (config readers,
Cells, host-side inputs, processing, parallelize plan, family record, tiny default and demo data).
Engines reach these packages only through `ms_mm.registry`, by name."""
