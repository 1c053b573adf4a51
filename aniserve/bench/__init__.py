"""Built-in benchmarks (``aniserve bench …``): figures are measured and reported, never asserted."""
