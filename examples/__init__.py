"""The bundled example model and the fixtures shared by tests and benchmarks."""
