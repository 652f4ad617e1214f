"""Support code below the stages: command-line plumbing, files, the hub and the offline default
model, data readers, the embedding cache, provenance, export and the MTEB bridge. The stage files
at the top level import it; it imports no stage. Each module's first line says who uses it."""
