"""Support code below the stages: CLI plumbing, files, the hub, the offline default model, corpus streaming,
the embedding cache and provenance. The stage files at the top level import it; it imports no stage."""
