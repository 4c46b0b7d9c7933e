"""The `mlite` command line: a thin face over `mergekit_lite.api` (installed as `mergekit_lite.cli`)."""
