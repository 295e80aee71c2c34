"""Built-in plugins: merge methods, refiners and suites, loaded through entry points."""
