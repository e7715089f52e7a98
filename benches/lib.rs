//! Benchmarks of Weft (`cargo bench -p weft-benches`); each prints its figures.
