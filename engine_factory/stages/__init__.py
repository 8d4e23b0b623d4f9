"""Pipeline stages, one verb per module: fetch, convert, calibrate, build, validate."""
