"""Datasets: generation (Glyph-FS), import of the seed's real datasets, filelists and loading."""
